"""api room: the FastAPI app, thin routes over the engine facade and storage interfaces."""
