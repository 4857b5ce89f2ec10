"""The QA dashboard (FastAPI) and its pages."""
