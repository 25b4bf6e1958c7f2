"""The caries-mim inference service: a FastAPI application around a model package's Predictor.

``create_app(settings)`` builds the application; ``caries-mim serve`` runs it with uvicorn. The library
(``caries_mim``) never imports this package.
"""

from service.app import create_app
from service.settings import ServiceSettings

__all__ = ["ServiceSettings", "create_app"]
