"""`python -m app`: serve Broadprop with uvicorn on the configured host and port, behind the
connection guard (request and send timeouts, a bound on connections; app/server/startup.py)."""

from app.server.startup import serve
from app.settings import get_settings


def main() -> None:
    settings = get_settings()
    print(f"Broadprop: http://{settings.host}:{settings.port}/", flush=True)
    serve(settings)


if __name__ == "__main__":
    main()
