#!/bin/sh
# Entrypoint of the caries-mim images (docker/Dockerfile, docker/Dockerfile.cpu).
#
#   (no arguments)                  caries-mim serve, configured by the CARIES_MIM_* variables of the image
#   serve|pretrain|finetune|...     caries-mim <command> <arguments>, e.g. `docker run IMAGE predict --model ...`
#   --port 9000 ...                 caries-mim serve --port 9000 ...
#   anything else                   run as given: torchrun ..., python ..., sh
#
# `exec` replaces this shell, so the command is the container's main process and receives SIGTERM itself:
# uvicorn then stops accepting, finishes in-flight requests and drains the inference queue; torchrun stops its
# workers. The same script runs the service outside Docker in the tests (tests/docker/test_entrypoint.py).
set -eu

if [ "$#" -eq 0 ]; then
    set -- serve
fi

case "$1" in
    serve | gateway | pretrain | finetune | evaluate | retune | predict | study | analyze | synth | inspect | demo | reference)
        exec caries-mim "$@"
        ;;
    -*)
        exec caries-mim serve "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
