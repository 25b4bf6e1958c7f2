"""caries-mim: masked image modeling on dental radiographs and caries detection.

The library never imports ``pipelines`` or ``service``; see DESIGN.md for the layer map.
"""

__version__ = "0.1.0"
