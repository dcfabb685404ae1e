"""`python -m app`: serve Broadprop with uvicorn on the configured host and port, behind the
connection guard (request and send timeouts, a bound on connections; app/server/startup.py)."""

from app.sandbox.pool import start_forkserver

# before the server's own imports (torch, FastAPI): the sandbox's forkserver imports torch
# and the interpreter beside them, so the first workers are ready about when the server is
start_forkserver()

from app.server.startup import serve  # noqa: E402
from app.settings import get_settings  # noqa: E402


def main() -> None:
    settings = get_settings()
    print(f"Broadprop: http://{settings.host}:{settings.port}/", flush=True)
    serve(settings)


if __name__ == "__main__":
    main()
