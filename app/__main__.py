"""`python -m app`: serve Broadprop with uvicorn on the configured host and port."""

import uvicorn

from app.settings import get_settings


def main() -> None:
    settings = get_settings()
    print(f"Broadprop: http://{settings.host}:{settings.port}/", flush=True)
    uvicorn.run("app.main:app", host=settings.host, port=settings.port, log_level="info")


if __name__ == "__main__":
    main()
