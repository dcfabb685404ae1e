"""Server limits and defaults, read from BROADPROP_* environment variables."""

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BROADPROP_")

    host: str = "127.0.0.1"  # loopback only unless asked otherwise
    port: int = Field(8000, ge=1, le=65535)
    memory_budget_bytes: int = Field(1 << 30, ge=1 << 20)  # per run, checked before allocating
    chunk_bytes: int = Field(4 << 20, ge=1 << 16)  # cap on one materialized broadcast chunk
    max_body_bytes: int = Field(64 << 10, ge=1024)  # request bodies over this get 413
    max_concurrent_runs: int = Field(0, ge=0)  # 0: derived from the cores
    torch_threads: int = Field(0, ge=0)  # per run; 0: derived from the cores
    queue_wait_s: float = Field(2.0, ge=0)  # a run that cannot start within this gets 503
    train_time_limit_s: float = Field(300.0, gt=0)  # a training stops (done) after this


@lru_cache
def get_settings() -> Settings:
    return Settings()
