"""Ray Serve: one deployment per served checkpoint behind a FastAPI ingress with the Gradio demo mounted
on it. ``app.app_builder`` is the import path of ``serve run`` / ``serve deploy serve/config.yaml``;
``lowlight serve`` starts the same application on a local Ray."""
