"""The ``caries-mim`` command line: one entry point, one subcommand per job.

User errors (:class:`caries_mim.errors.CariesMimError`) become one line on stderr and exit status 2; anything
else becomes one line and exit status 1 (set ``CARIES_MIM_DEBUG=1`` for the traceback). A traceback shown to a
user by default is a bug.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from caries_mim import __version__
from caries_mim.errors import CariesMimError, InvalidArgumentError, InvalidConfigError
from caries_mim.io import DEFAULT_ALLOWED_MODALITIES, DEFAULT_MAX_PIXELS, ReadOptions

EXIT_OK = 0
EXIT_INTERNAL_ERROR = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

log = logging.getLogger("caries_mim.cli")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a number >= 1, got 0")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _positive_minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of minutes, got {text!r}") from None
    if not 0 < value < 10_000:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"expected minutes > 0, got {text}")
    return value


def _modalities(text: str) -> frozenset[str]:
    values = frozenset(part.strip().upper() for part in text.split(",") if part.strip())
    if not values:
        raise argparse.ArgumentTypeError("expected a comma-separated list such as DX,IO,PX,CR")
    return values


def _add_read_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--modalities",
        type=_modalities,
        default=DEFAULT_ALLOWED_MODALITIES,
        metavar="LIST",
        help=f"DICOM modalities accepted, comma-separated (default: {','.join(sorted(DEFAULT_ALLOWED_MODALITIES))})",
    )
    parser.add_argument(
        "--dicom-only", action="store_true", help="refuse PNG/JPEG/TIFF/MHA/NRRD/NIfTI files (default: accept them)"
    )
    parser.add_argument(
        "--max-pixels",
        type=_non_negative_int,
        default=DEFAULT_MAX_PIXELS,
        help="refuse images with more than this many pixels, before decoding (default: %(default)s)",
    )


def _read_options(args: argparse.Namespace) -> ReadOptions:
    return ReadOptions(
        allowed_modalities=args.modalities, allow_non_dicom=not args.dicom_only, max_pixels=args.max_pixels
    )


def _cmd_inspect(args: argparse.Namespace) -> int:
    from pipelines.inspect_files import inspect_files

    seen, readable = inspect_files(args.files, _read_options(args), sys.stdout, reveal_uids=args.reveal_uids)
    if seen == 0:
        raise InvalidArgumentError("no files found under the given paths")
    print(f"inspect: {readable} of {seen} file(s) readable", file=sys.stderr)
    return EXIT_OK if readable == seen else EXIT_USER_ERROR


def _cmd_synth(args: argparse.Namespace) -> int:
    from caries_mim.synth import generate_dataset
    from pipelines.config import synth_config

    summary = generate_dataset(
        args.out,
        n_unlabeled=args.unlabeled,
        n_labeled=args.labeled,
        seed=args.seed,
        config=synth_config(args.overrides),
        progress=not args.quiet,
        workers=args.workers,
    )
    print(json.dumps(summary.to_dict()))
    return EXIT_OK


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from pipelines.config import to_dict
    from pipelines.pretrain import load_pretrain_config, run_pretrain
    from pipelines.run_folder import read_run_config

    base = read_run_config(args.out) if args.resume else None
    config = load_pretrain_config(args.config, args.set, base=base)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return EXIT_OK
    if not args.data:
        raise InvalidArgumentError("--data: give at least one folder of unlabeled radiographs")
    summary = run_pretrain(args.data, args.out, config, resume=args.resume, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary))
    return EXIT_OK


def _cmd_finetune(args: argparse.Namespace) -> int:
    from pipelines.config import path_override, to_dict
    from pipelines.finetune import load_finetune_config, run_finetune
    from pipelines.run_folder import read_run_config

    base = read_run_config(args.out) if args.resume else None
    overrides = list(args.set or [])
    if args.encoder is not None:
        overrides.append(path_override("model.encoder", args.encoder))
    config = load_finetune_config(args.config, overrides, base=base)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return EXIT_OK
    if not args.train or not args.val:
        raise InvalidArgumentError("--train and --val: give the training and validation annotation files")
    summary = run_finetune(args.train, args.val, args.out, config, resume=args.resume, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary))
    return EXIT_OK


def _print_study(summary: dict) -> int:
    """A study's table (its markdown file), then its summary as one JSON line without the rows."""
    print(Path(summary["markdown"]).read_text(encoding="utf-8"), end="")
    print(json.dumps({key: value for key, value in summary.items() if key != "rows"}))
    return EXIT_OK


def _cmd_study_label_efficiency(args: argparse.Namespace) -> int:
    from pipelines.study import command_line, parse_fractions, run_label_efficiency

    summary = run_label_efficiency(
        train=args.train,
        val=args.val,
        test=args.test,
        encoder=args.encoder,
        out=args.out,
        config=args.config,
        overrides=args.set or [],
        fractions=parse_fractions(args.fractions),
        seeds=args.seeds,
        bootstrap=args.bootstrap,
        progress=not args.quiet,
        command=command_line(args.argv),
    )
    return _print_study(summary)


def _cmd_analyze(args: argparse.Namespace) -> int:
    from pipelines.analyze import AnalysisSettings, parse_encoders, run_analyze, summary_line

    settings = AnalysisSettings(
        images=args.images,
        spacing_mm=args.spacing_mm,
        crop=args.crop,
        probe_crop=args.probe_crop,
        healthy_per_image=args.healthy_per_image,
        seed=args.seed,
    )
    summary = run_analyze(
        parse_encoders(args.encoder),
        args.data,
        args.out,
        labels=args.labels,
        settings=settings,
        options=_read_options(args),
        progress=not args.quiet,
    )
    print(json.dumps(summary_line(summary)))
    return EXIT_OK


def _cmd_study_objectives(args: argparse.Namespace) -> int:
    from pipelines.study import command_line, parse_fractions
    from pipelines.study_objectives import parse_objectives, run_objectives_study

    summary = run_objectives_study(
        data=args.data,
        train=args.train,
        val=args.val,
        test=args.test,
        out=args.out,
        objectives=parse_objectives(args.objectives),
        pretrain_config=args.pretrain_config,
        pretrain_overrides=args.pretrain_set or [],
        finetune_config=args.config,
        finetune_overrides=args.set or [],
        fractions=parse_fractions(args.fractions),
        seed=args.seed,
        bootstrap=args.bootstrap,
        progress=not args.quiet,
        command=command_line(args.argv),
    )
    return _print_study(summary)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pipelines.evaluate import run_evaluate

    summary = run_evaluate(
        args.model,
        args.data,
        args.out,
        overlays=args.overlays,
        bootstrap=args.bootstrap,
        seed=args.seed,
        progress=not args.quiet,
        device=args.device,
        options=_read_options(args),
    )
    print(json.dumps(summary))
    return EXIT_OK


def _cmd_retune(args: argparse.Namespace) -> int:
    from pipelines.config import parse_overrides
    from pipelines.retune import retune_package

    # Taken by their own name or, as in a fine-tuning config, under detector. (detector.test_time_flip=true).
    settings = parse_overrides(args.set)
    if isinstance(settings.get("detector"), dict):
        settings.update(settings.pop("detector"))
    nested = sorted(key for key, value in settings.items() if isinstance(value, dict))
    if nested:
        raise InvalidArgumentError(f"--set takes detector settings such as box_fusion_iou=0.5, not {', '.join(nested)}")
    summary = retune_package(
        args.model,
        args.val,
        args.out,
        settings,
        target_sensitivity=args.target_sensitivity,
        progress=not args.quiet,
        device=args.device,
        options=_read_options(args),
    )
    print(json.dumps(summary))
    return EXIT_OK


def _cmd_predict(args: argparse.Namespace) -> int:
    from caries_mim.package import shipped_reference_detector
    from pipelines.predict import run_predict

    predicted, seen = run_predict(
        args.model if args.model is not None else shipped_reference_detector(),
        args.files,
        overlay_dir=args.overlay,
        options=_read_options(args),
        out=sys.stdout,
        device=args.device,
        include_below_threshold=args.all_findings,
    )
    if seen == 0:
        raise InvalidArgumentError("no radiograph files found under the given paths")
    print(f"predict: {predicted} of {seen} file(s) predicted", file=sys.stderr)
    return EXIT_OK if predicted == seen else EXIT_USER_ERROR


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import run_demo

    given = {
        "n_unlabeled": args.unlabeled,
        "n_labeled": args.labeled,
        "pretrain_steps": args.pretrain_steps,
        "finetune_steps": args.finetune_steps,
        "budget_seconds": None if args.budget_minutes is None else 60.0 * args.budget_minutes,
    }
    run_demo(
        Path(args.out),
        seed=args.seed,
        encoder=args.encoder,
        **{name: value for name, value in given.items() if value is not None},
    )
    return EXIT_OK


def _cmd_reference(args: argparse.Namespace) -> int:
    from pipelines.reference import load_reference_config, run_reference

    config = load_reference_config(args.config, args.set)
    provenance = run_reference(
        args.out,
        args.work,
        config,
        command=["caries-mim", *args.argv],
        progress=not args.quiet,
        keep_foundation=args.keep_foundation,
        keep_detector=args.keep_detector,
    )
    print(json.dumps({"out": str(args.out), "test_metrics": provenance["test_metrics"], "files": provenance["files"]}))
    return EXIT_OK


def _destination(text: str):
    """NAME=AET@HOST:PORT -> a gateway destination."""
    from service.gateway.sender import Destination

    name, _, node = text.partition("=")
    ae_title, _, address = node.partition("@")
    host, _, port = address.rpartition(":")
    if not (name and ae_title and host and port.isdigit()):
        raise argparse.ArgumentTypeError(f"expected NAME=AET@HOST:PORT, got {text!r}")
    try:
        return Destination(name, ae_title, host, int(port))
    except InvalidArgumentError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _add_gateway_database(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database",
        default=os.environ.get("CARIES_MIM_GATEWAY_DATABASE") or None,
        metavar="URL",
        help="keep jobs, deliveries and the DICOMweb catalog in PostgreSQL (postgresql://user@host/db) instead of "
        "ROOT/gateway.sqlite3 (default: CARIES_MIM_GATEWAY_DATABASE, else SQLite)",
    )


def _gateway_results(text: str) -> tuple[str, ...]:
    """``sr,gsps`` -> ("sr", "gsps"), checked against the kinds the gateway makes."""
    from service.gateway.analysis import RESULT_KINDS

    kinds = tuple(kind.strip().lower() for kind in text.split(",") if kind.strip())
    unknown = [kind for kind in kinds if kind not in RESULT_KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"expected one or more of {', '.join(RESULT_KINDS)}, got {text!r}")
    return kinds


def _cmd_gateway_run(args: argparse.Namespace) -> int:
    # Like serve: the gateway lives in service/, imported only when asked for.
    import signal
    import socket
    import threading

    from caries_mim.package import shipped_reference_detector
    from service.gateway.gateway import Gateway, GatewayConfig
    from service.gateway.scp import ScpConfig
    from service.settings import is_loopback, read_api_keys

    scp = ScpConfig(
        ae_title=args.ae_title,
        host=args.host,
        port=args.port,
        calling_ae_titles=tuple(args.calling_ae or ()),
        stable_after_s=args.stable_after,
    )
    config = GatewayConfig(
        root=args.root,
        database=args.database,
        model=args.model or shipped_reference_detector(),
        scp=scp,
        destinations=tuple(args.destination or ()),
        workers=args.workers,
        device=args.device,
        read_options=_read_options(args),
        outputs=tuple(args.results),
    )
    keys_file = args.api_keys_file or os.environ.get("CARIES_MIM_API_KEYS_FILE")
    api_keys = read_api_keys(
        os.environ.get("CARIES_MIM_API_KEYS", "").split(","), Path(keys_file) if keys_file else None
    )
    http = args.http_port is not None
    if http and not (api_keys or args.insecure or is_loopback(args.http_host)):
        raise InvalidConfigError(
            f"refusing to serve DICOMweb on {args.http_host} without API keys: set CARIES_MIM_API_KEYS or "
            "--api-keys-file, or pass --insecure to serve unauthenticated"
        )
    listener = None
    if http:
        # Bound before the gateway starts, so that the port (0: the system's choice) is known and printed at once.
        try:
            listener = socket.create_server((args.http_host, args.http_port), family=_address_family(args.http_host))
        except OSError as exc:
            raise InvalidConfigError(
                f"cannot serve DICOMweb on {args.http_host}:{args.http_port}: {exc.strerror or exc}"
            ) from None
    stop = threading.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signal_number, lambda *_: stop.set())
    gateway = Gateway(config)
    try:
        gateway.start()
        started = {
            "gateway": scp.ae_title,
            "host": scp.host,
            "port": gateway.scp.port,
            "root": str(config.root),
            "destinations": [destination.name for destination in config.destinations],
        }
        if listener is not None:
            started |= {"http_host": args.http_host, "http_port": listener.getsockname()[1]}
        print(json.dumps(started), flush=True)
        if listener is None:
            stop.wait()
        else:
            _serve_gateway_http(gateway, listener, api_keys, args.public_url, stop)
    finally:
        gateway.stop()
        if listener is not None:
            listener.close()
    return EXIT_OK


def _address_family(host: str):
    import socket

    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _serve_gateway_http(gateway, listener, api_keys: frozenset[str], public_url: str | None, stop) -> None:
    """DICOMweb and the status route on ``listener`` until SIGTERM or Ctrl-C (uvicorn's handlers, which then hand
    the signal back to ours)."""
    import threading

    import uvicorn

    from service.gateway.web import create_gateway_app

    app = create_gateway_app(
        gateway.store, api_keys=api_keys, stable_after_s=gateway.config.scp.stable_after_s, public_url=public_url
    )

    class GatewayServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # The first SIGTERM or Ctrl-C stops the DICOM side at once too, while HTTP drains its requests (the SCP's
            # stop joins its associations: not in the signal handler).
            threading.Thread(target=gateway.scp.stop, name="gateway-scp-stop").start()
            super().handle_exit(sig, frame)

    server = GatewayServer(uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=30))
    if not stop.is_set():
        server.run(sockets=[listener])


def _cmd_gateway_status(args: argparse.Namespace) -> int:
    from service.gateway.store import GatewayStore, StoreError, store_exists
    from service.gateway.web import queue_status

    try:
        exists = store_exists(args.root, args.database)
    except StoreError as exc:
        raise InvalidConfigError(f"the gateway's PostgreSQL database cannot be reached ({exc})") from None
    if not exists:
        where = "the PostgreSQL database" if args.database else f"{args.root} (gateway.sqlite3)"
        raise InvalidArgumentError(f"{where} holds no gateway store")
    store = GatewayStore(args.root, database=args.database)
    try:
        print(json.dumps(queue_status(store)))
    finally:
        store.close()
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    # The service is its own top-level package (DESIGN: pipelines build on caries_mim only); the CLI is merely
    # its launcher, so it is imported here, when asked for, and nowhere else in pipelines/.
    from service.server import serve
    from service.settings import ServiceSettings

    given = {
        name: value
        for name, value in (
            ("model", args.model),
            ("host", args.host),
            ("port", args.port),
            ("workers", args.workers),
            ("device", args.device),
            ("api_keys_file", args.api_keys_file),
            ("log_level", args.log_level),
        )
        if value is not None
    }
    if args.insecure:
        given["insecure"] = True
    settings = ServiceSettings.from_flags(given)
    serve(settings)
    return EXIT_OK


def _add_run_options(parser: argparse.ArgumentParser, *, shipped: str, example: str) -> None:
    """--out, --config, --set, --resume, --print-config and --quiet: what every training command takes."""
    parser.add_argument("--out", type=Path, required=True, metavar="RUN", help="run folder")
    parser.add_argument("--config", metavar="FILE|NAME", help=f"YAML config, or a shipped one: {shipped}")
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help=f"override one config value, e.g. {example} (repeatable)"
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in RUN from its last checkpoint")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caries-mim",
        description="Masked image modeling on dental radiographs, caries detection, DICOM inference.",
    )
    parser.add_argument("--version", action="version", version=f"caries-mim {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect",
        help="describe radiograph files as JSON lines (or say why they cannot be read)",
        description="One JSON line per file on stdout. Exit status 0 when every file was readable, 2 otherwise.",
    )
    inspect.add_argument("files", nargs="+", metavar="FILE", help="files, or folders to walk")
    inspect.add_argument(
        "--reveal-uids", action="store_true", help="print DICOM UIDs in clear (default: SOP Instance UID hashed)"
    )
    _add_read_options(inspect)
    inspect.set_defaults(handler=_cmd_inspect)

    synth = commands.add_parser(
        "synth",
        help="write a synthetic dental radiograph set (DICOM + COCO)",
        description="Writes OUT/unlabeled/*.dcm, OUT/labeled/images/*.dcm and OUT/labeled/{train,val,test}.json.",
    )
    synth.add_argument("out", type=Path, metavar="OUT", help="output folder")
    synth.add_argument("--unlabeled", type=_non_negative_int, default=0, metavar="N", help="unlabeled images")
    synth.add_argument("--labeled", type=_non_negative_int, default=0, metavar="M", help="labeled images")
    synth.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default: %(default)s)")
    synth.add_argument(
        "--workers", type=_positive_int, default=1, help="processes rendering in parallel; output is identical"
    )
    synth.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a generator setting (SynthConfig field), e.g. --set exposure_photons=[300,1500]; repeatable",
    )
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(handler=_cmd_synth)

    pretrain = commands.add_parser(
        "pretrain",
        help="pretrain a ViT encoder with masked image modeling (MAE, SimMIM) on unlabeled radiographs",
        description="Writes RUN/encoder.pt, checkpoints, TensorBoard logs and reconstruction pictures. Runs on one "
        "CPU or GPU as is, and on many GPUs or nodes under torchrun (same arguments).",
    )
    pretrain.add_argument("--data", nargs="+", type=Path, metavar="DIR", help="folders (or files) of radiographs")
    _add_run_options(
        pretrain,
        shipped="tiny (CPU, minutes), demo (what the demo continues the foundation encoder with), reference_cpu "
        "(the CPU foundation encoder), reference, vit_small, vit_base (GPU hosts); default: built-in ViT-S/16 MAE "
        "recipe",
        example="--set optim.batch_size=32 --set objective.name=simmim",
    )
    pretrain.set_defaults(handler=_cmd_pretrain)

    finetune = commands.add_parser(
        "finetune",
        help="fine-tune the caries detector on annotated radiographs (COCO, DENTEX or CSV), from a MIM encoder",
        description="Writes RUN/model.cmpkg (the best validation AP50, with its operating threshold), checkpoints, "
        "TensorBoard logs and validation overlays. Runs on one CPU or GPU as is, and on many GPUs under torchrun.",
    )
    finetune.add_argument("--train", nargs="+", type=Path, metavar="FILE", help="training annotation file(s)")
    finetune.add_argument("--val", nargs="+", type=Path, metavar="FILE", help="validation annotation file(s)")
    finetune.add_argument(
        "--encoder", metavar="ENCODER_PT", help="encoder.pt from `caries-mim pretrain` (default: random init)"
    )
    _add_run_options(
        finetune,
        shipped="tiny (CPU, minutes), demo (what the demo runs), reference_cpu (the CPU reference detector), "
        "reference, vit_small (GPU hosts); default: built-in ViT-S recipe",
        example="--set optim.lr=1e-4 --set data.label_fraction=0.25",
    )
    finetune.set_defaults(handler=_cmd_finetune)

    analyze = commands.add_parser(
        "analyze",
        help="what pretraining did to encoders: attention distance, NMI, Fourier, effective rank, probes",
        description="Measures one or several encoders on the same radiographs (resampled to --spacing-mm, centre "
        "crops of --crop px): mean attention distance and query-key NMI per block and head, the relative log "
        "amplitude of the highest frequency and the effective rank of each block's tokens and, with --labels, "
        "linear-probe and k-NN accuracy of frozen features on lesion and healthy-surface crops. Writes "
        "OUT/analysis.json, one PNG per measure (encoders overlaid) and OUT/attention/*.png; prints a one-line "
        "JSON summary.",
    )
    analyze.add_argument(
        "--encoder",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="an encoder.pt (from caries-mim pretrain, or models/foundation_encoder.pt) under a name; repeatable",
    )
    analyze.add_argument("--data", type=Path, required=True, metavar="DIR", help="folder of radiographs")
    analyze.add_argument(
        "--labels", type=Path, metavar="FILE", help="annotations (COCO, DENTEX or box CSV) for the probes"
    )
    analyze.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    analyze.add_argument("--images", type=_positive_int, default=16, help="radiographs measured (default: %(default)s)")
    analyze.add_argument(
        "--spacing-mm",
        type=_positive_float,
        default=0.1,
        help="working spacing the radiographs are resampled to, mm/px (default: %(default)s, the demo's)",
    )
    analyze.add_argument(
        "--crop", type=_positive_int, default=160, help="side of the measured field, px (default: %(default)s)"
    )
    analyze.add_argument(
        "--probe-crop", type=_positive_int, default=64, help="side of a probe crop, px (default: %(default)s)"
    )
    analyze.add_argument(
        "--healthy-per-image",
        type=_non_negative_int,
        default=2,
        help="healthy-surface probe crops per labelled image (default: %(default)s)",
    )
    analyze.add_argument("--seed", type=_non_negative_int, default=0, help="image choice and split seed")
    analyze.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_read_options(analyze)
    analyze.set_defaults(handler=_cmd_analyze)

    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate a model package on annotated radiographs (COCO AP, FROC, image-level, 95%% CIs, plots)",
        description="Writes OUT/metrics.json, OUT/predictions.json (pycocotools results), OUT/pr_curve.png, "
        "OUT/froc.png and OUT/overlays/*.png; prints a one-line JSON summary.",
    )
    evaluate.add_argument("--model", type=Path, required=True, metavar="PKG", help="model package (model.cmpkg)")
    evaluate.add_argument(
        "--data",
        nargs="+",
        type=Path,
        required=True,
        metavar="FILE",
        help="annotation files: COCO json, DENTEX json or box CSV; classes must be the package's (by name)",
    )
    evaluate.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    evaluate.add_argument(
        "--overlays", type=_non_negative_int, default=8, metavar="N", help="overlay pictures (default: %(default)s)"
    )
    evaluate.add_argument(
        "--bootstrap",
        type=_non_negative_int,
        default=1000,
        metavar="N",
        help="bootstrap resamples for 95%% confidence intervals; 0 skips them (default: %(default)s)",
    )
    evaluate.add_argument("--seed", type=_non_negative_int, default=0, help="bootstrap seed (default: %(default)s)")
    evaluate.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_read_options(evaluate)
    evaluate.set_defaults(handler=_cmd_evaluate)

    retune = commands.add_parser(
        "retune",
        help="give a model package new inference settings (box fusion, test-time flips, NMS, sliding window) and "
        "choose its operating threshold again on validation images",
        description="Writes OUT: the package's weights with the new settings and a threshold chosen on the "
        "validation images for the package's target lesion sensitivity; its provenance records the change. Prints "
        "a one-line JSON summary. Use the fine-tuning run's validation split, never its training images.",
    )
    retune.add_argument("--model", type=Path, required=True, metavar="PKG", help="model package to retune")
    retune.add_argument(
        "--val", nargs="+", type=Path, required=True, metavar="FILE", help="validation annotation files"
    )
    retune.add_argument("--out", type=Path, required=True, metavar="PKG", help="the retuned package")
    retune.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="an inference setting, e.g. test_time_vertical_flip=true or box_fusion_iou=0.5 (repeatable)",
    )
    retune.add_argument(
        "--target-sensitivity",
        type=float,
        metavar="S",
        help="lesion sensitivity in (0, 1] the threshold is chosen for (default: the package's)",
    )
    retune.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    retune.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_read_options(retune)
    retune.set_defaults(handler=_cmd_retune)

    predict = commands.add_parser(
        "predict",
        help="find caries on radiograph files with a model package (JSON lines)",
        description="One JSON line per file on stdout: its findings at the package's operating point, or why it "
        "cannot be read. Exit status 0 when every file was predicted, 2 otherwise.",
    )
    predict.add_argument(
        "--model", type=Path, metavar="PKG", help="model package (default: the shipped reference detector)"
    )
    predict.add_argument("files", nargs="+", metavar="FILE", help="files, or folders to search for radiographs")
    predict.add_argument("--overlay", type=Path, metavar="DIR", help="also write DIR/<file stem>.png with findings")
    predict.add_argument(
        "--all-findings", action="store_true", help="list detections below the operating threshold too"
    )
    predict.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    _add_read_options(predict)
    predict.set_defaults(handler=_cmd_predict)

    study = commands.add_parser("study", help="experiments made of many runs (label-efficiency, objectives)")
    studies = study.add_subparsers(dest="study", required=True, metavar="STUDY")
    label_efficiency = studies.add_parser(
        "label-efficiency",
        help="fine-tune from scratch and from the MIM encoder on growing label fractions; AP50 on one test split",
        description="For each label fraction and seed, fine-tunes twice (random encoder of the same architecture, "
        "and the MIM encoder) and evaluates both on the test split. Writes OUT/label_efficiency.{md,csv,png} and "
        "one run folder per fine-tuning; finished runs are reused when the command is repeated.",
    )
    label_efficiency.add_argument("--train", nargs="+", type=Path, required=True, metavar="FILE")
    label_efficiency.add_argument("--val", nargs="+", type=Path, required=True, metavar="FILE")
    label_efficiency.add_argument("--test", nargs="+", type=Path, required=True, metavar="FILE")
    label_efficiency.add_argument(
        "--encoder", type=Path, required=True, metavar="ENCODER_PT", help="encoder.pt from `caries-mim pretrain`"
    )
    label_efficiency.add_argument("--out", type=Path, required=True, metavar="DIR")
    label_efficiency.add_argument(
        "--fractions",
        default="5,10,25,50,100",
        metavar="PERCENTS",
        help="label fractions in percent of the training images (default: %(default)s)",
    )
    label_efficiency.add_argument(
        "--seeds", type=_non_negative_int, nargs="+", default=[0], metavar="N", help="seeds (default: 0)"
    )
    label_efficiency.add_argument("--config", metavar="FILE|NAME", help="fine-tuning config (as for finetune)")
    label_efficiency.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="fine-tuning config override (repeatable)"
    )
    label_efficiency.add_argument(
        "--bootstrap", type=_non_negative_int, default=1000, metavar="N", help="bootstrap resamples for the CIs"
    )
    label_efficiency.add_argument("--quiet", action="store_true", help="no progress bars")
    label_efficiency.set_defaults(handler=_cmd_study_label_efficiency)
    objectives = studies.add_parser(
        "objectives",
        help="pretrain MAE, SimMIM, MoCo, hybrid and SemanticMIM on one budget; analyze and fine-tune each",
        description="Pretrains every objective on the same unlabeled images with the same steps and encoder size, "
        "measures them together (caries-mim analyze, probes on the validation labels), fine-tunes each at the "
        "label fractions beside a random encoder and evaluates on the test split. Writes "
        "OUT/objectives.{md,csv,png}, OUT/analysis/ and one folder per run; finished runs are reused when the "
        "command is repeated.",
    )
    objectives.add_argument(
        "--data", nargs="+", type=Path, required=True, metavar="DIR", help="unlabeled radiograph folders"
    )
    objectives.add_argument("--train", nargs="+", type=Path, required=True, metavar="FILE")
    objectives.add_argument("--val", nargs="+", type=Path, required=True, metavar="FILE")
    objectives.add_argument("--test", nargs="+", type=Path, required=True, metavar="FILE")
    objectives.add_argument("--out", type=Path, required=True, metavar="DIR")
    objectives.add_argument(
        "--objectives",
        default="mae,simmim,moco,hybrid,semantic_mim",
        metavar="NAMES",
        help="objectives compared, comma-separated (default: %(default)s)",
    )
    objectives.add_argument(
        "--pretrain-config", default="demo", metavar="FILE|NAME", help="pretraining config (default: %(default)s)"
    )
    objectives.add_argument(
        "--pretrain-set", action="append", metavar="KEY=VALUE", help="pretraining override, e.g. train.steps=1000"
    )
    objectives.add_argument(
        "--config", default="demo", metavar="FILE|NAME", help="fine-tuning config (default: %(default)s)"
    )
    objectives.add_argument("--set", action="append", metavar="KEY=VALUE", help="fine-tuning override (repeatable)")
    objectives.add_argument(
        "--fractions", default="10,100", metavar="PERCENTS", help="label fractions in percent (default: %(default)s)"
    )
    objectives.add_argument("--seed", type=_non_negative_int, default=0, help="fine-tuning and analysis seed")
    objectives.add_argument(
        "--bootstrap", type=_non_negative_int, default=1000, metavar="N", help="bootstrap resamples for the CIs"
    )
    objectives.add_argument("--quiet", action="store_true", help="no progress bars")
    objectives.set_defaults(handler=_cmd_study_objectives)

    demo = commands.add_parser(
        "demo",
        help="run the main job on embedded synthetic data (what `make demo` runs)",
        description="Generates a synthetic set, reads every file back, loads the annotations, writes preview "
        "pictures, optionally continues MAE pretraining of the MIM encoder (the shipped foundation encoder "
        "unless --encoder) on the images, fine-tunes the caries detector from it, evaluates it on the test "
        "split, predicts on a few files and queries the service with one of them.",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: %(default)s)")
    demo.add_argument("--seed", type=_non_negative_int, default=0)
    # Defaults (None here) are pipelines/demo.py's DEMO_* sizes, named in the help; that module is not imported
    # until the demo runs, so the command line starts fast.
    demo.add_argument(
        "--unlabeled", type=_non_negative_int, default=None, metavar="N", help="unlabeled images (default: 0)"
    )
    demo.add_argument(
        "--labeled",
        type=_non_negative_int,
        default=None,
        metavar="M",
        help="labeled images, split 70/15/15 into train/val/test (default: 800)",
    )
    demo.add_argument(
        "--encoder",
        type=Path,
        default=None,
        metavar="ENCODER_PT",
        help="the MIM encoder the detector starts from (default: the shipped models/foundation_encoder.pt); with "
        "--pretrain-steps it must be a 6-block ViT-Tiny/16 like that one (pretrain_demo.yaml)",
    )
    demo.add_argument(
        "--pretrain-steps",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="MAE steps continuing the encoder on the demo's images (config: demo) before fine-tuning; 0 skips "
        "them (default: 0)",
    )
    demo.add_argument(
        "--finetune-steps",
        type=_positive_int,
        default=None,
        metavar="N",
        help="detector fine-tuning steps with the demo config (default: those that fit --budget-minutes here)",
    )
    demo.add_argument(
        "--budget-minutes",
        type=_positive_minutes,
        default=None,
        metavar="M",
        help="wall-clock minutes for the whole demo: fine-tuning gets what the evaluations after it leave (priced by "
        "a step timed here) as a time limit, and runs the steps that fit it at its own measured rate, at most the "
        "demo config's (default: 13.25, inside the 15-minute promise)",
    )
    demo.set_defaults(handler=_cmd_demo)

    reference = commands.add_parser(
        "reference",
        help="rebuild the shipped foundation encoder and reference detector from scratch (resumable)",
        description="Synthetic data, MIM pretraining, fine-tuning, evaluation on a fresh seed and on a second "
        "generator, then OUT/foundation_encoder.pt, OUT/reference_detector.cmpkg (fp16) and OUT/provenance.json. "
        "Stages already done in WORK are kept; an interrupted build continues where it stopped.",
    )
    reference.add_argument("--out", type=Path, default=Path("models"), help="where the models go (default: models)")
    reference.add_argument(
        "--work", type=Path, default=Path("runs/reference"), help="data and runs (default: runs/reference)"
    )
    reference.add_argument(
        "--config",
        metavar="FILE|NAME",
        help="YAML config, or a shipped one: default (the full build, a GPU host), cpu (sized for 2 CPU cores), smoke "
        "(the chain in a minute)",
    )
    reference.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config value")
    reference.add_argument(
        "--keep-foundation",
        action="store_true",
        help="fine-tune and evaluate the detector again from the foundation encoder already in OUT (checked against "
        "OUT/provenance.json, which it carries over) instead of pretraining one",
    )
    reference.add_argument(
        "--keep-detector",
        action="store_true",
        help="keep the detector in OUT too (implies --keep-foundation): apply the recipe's inference settings, "
        "choose its threshold again on the fine-tuning validation split, evaluate again; no fine-tuning",
    )
    reference.add_argument("--quiet", action="store_true", help="no progress bars")
    reference.set_defaults(handler=_cmd_reference)

    serve = commands.add_parser(
        "serve",
        help="serve a model package over HTTP (FastAPI: DICOM in; JSON, DICOM SR or PNG out)",
        description="Starts the inference service. Every flag can also come from a CARIES_MIM_* environment "
        "variable (CARIES_MIM_MODEL, CARIES_MIM_API_KEYS=key1,key2, CARIES_MIM_MAX_BATCH_SIZE, ...; see the "
        "README); flags win. Listening beyond loopback needs API keys or --insecure.",
    )
    serve.add_argument(
        "--model", type=Path, metavar="PKG", help="model package (default: the shipped reference detector)"
    )
    serve.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=_non_negative_int, help="port (default: 8000)")
    serve.add_argument("--workers", type=_positive_int, help="worker processes, each with its own model (default: 1)")
    serve.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    serve.add_argument("--api-keys-file", type=Path, metavar="FILE", help="accepted API keys, one per line")
    serve.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback address without API keys (no authentication)"
    )
    serve.add_argument("--log-level", help="JSON log level (default: INFO)")
    serve.set_defaults(handler=_cmd_serve)

    gateway = commands.add_parser(
        "gateway",
        help="a DICOM gateway: radiographs in by C-STORE, caries SRs back to the PACS (durable jobs)",
        description="run: the Storage SCP, job runners and result sender on one folder, until SIGTERM or Ctrl-C; "
        "status: that folder's queue as JSON. See docs/pacs.md.",
    )
    gateway_commands = gateway.add_subparsers(dest="gateway_command", required=True)
    run = gateway_commands.add_parser("run", help="receive, analyse and send results back until stopped")
    run.add_argument("--root", type=Path, required=True, help="the gateway's folder (instances, results, store)")
    _add_gateway_database(run)
    run.add_argument("--model", type=Path, metavar="PKG", help="model package (default: the shipped reference)")
    run.add_argument("--ae-title", default="CARIESMIM", help="the gateway's AE title (default: %(default)s)")
    run.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    run.add_argument("--port", type=_non_negative_int, default=11112, help="DICOM port (default: %(default)s)")
    run.add_argument(
        "--calling-ae", action="append", metavar="AET", help="an AE title allowed to send (repeat; default: any)"
    )
    run.add_argument(
        "--destination",
        action="append",
        type=_destination,
        metavar="NAME=AET@HOST:PORT",
        help="where results are sent by C-STORE (repeat for several)",
    )
    run.add_argument("--workers", type=_positive_int, default=1, help="job runners (default: %(default)s)")
    run.add_argument(
        "--stable-after",
        type=float,
        default=0.0,
        metavar="S",
        help="analyse a study once it received nothing for S seconds (default: each instance at once)",
    )
    run.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    run.add_argument(
        "--results",
        type=_gateway_results,
        default=("sr",),
        metavar="KIND[,KIND]",
        help="what each radiograph gets back: sr (a TID 1500 Structured Report), gsps (a presentation state drawing "
        "the boxes on the original), sc (a Secondary Capture with the boxes burnt in), comma-separated "
        "(default: sr)",
    )
    run.add_argument(
        "--http-port",
        type=_non_negative_int,
        metavar="PORT",
        help="serve DICOMweb (STOW-RS, QIDO-RS, WADO-RS) and /v1/gateway/status on this port (0: any free one, "
        "printed at start; default: no HTTP)",
    )
    run.add_argument("--http-host", default="127.0.0.1", help="address DICOMweb listens on (default: %(default)s)")
    run.add_argument("--public-url", metavar="URL", help="the gateway's address as clients reach it, for retrieve URLs")
    run.add_argument(
        "--api-keys-file",
        type=Path,
        metavar="FILE",
        help="bearer keys DICOMweb accepts, one per line (default: CARIES_MIM_API_KEYS_FILE; with "
        "CARIES_MIM_API_KEYS, comma-separated, as for serve)",
    )
    run.add_argument(
        "--insecure", action="store_true", help="serve DICOMweb beyond loopback without API keys (not advised)"
    )
    _add_read_options(run)
    run.set_defaults(handler=_cmd_gateway_run)
    status = gateway_commands.add_parser("status", help="the queue of a gateway folder, as JSON")
    status.add_argument("--root", type=Path, required=True, help="the gateway's folder")
    _add_gateway_database(status)
    status.set_defaults(handler=_cmd_gateway_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # What the user typed, for outputs that record their own command (the study's table).
    args.argv = argv
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.command == "gateway":
        # A server: what it received, stored, sent and refused is its operators' record (no identifiers in it).
        logging.getLogger("service.gateway").setLevel(logging.INFO)
    if not args.verbose:
        # pydicom logs every non-conformance it also raises as a warning, and every decoder plugin that fails on a
        # file with its traceback (before trying the next plugin): commands report each file's outcome themselves.
        logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    try:
        return args.handler(args)
    except CariesMimError as exc:
        print(f"caries-mim {args.command}: error [{exc.code}]: {exc.message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"caries-mim {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if os.environ.get("CARIES_MIM_DEBUG"):
            traceback.print_exc()
        print(
            f"caries-mim {args.command}: internal error ({type(exc).__name__}: {exc}); "
            "set CARIES_MIM_DEBUG=1 for the traceback and report it",
            file=sys.stderr,
        )
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
