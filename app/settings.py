"""Server limits and defaults, read from BROADPROP_* environment variables."""

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BROADPROP_")

    host: str = "127.0.0.1"  # loopback only unless asked otherwise
    port: int = Field(8000, ge=1, le=65535)
    # Host headers accepted besides the loopback names (127.0.0.1, localhost, [::1]) on the
    # serving port: comma-separated names or addresses, e.g. "192.168.1.20,teacher.local"
    # (a name without a port matches on the serving port); "*" accepts any (unsafe).
    allowed_hosts: str = ""
    memory_budget_bytes: int = Field(1 << 30, ge=1 << 20)  # per run, checked before allocating
    chunk_bytes: int = Field(4 << 20, ge=1 << 16)  # cap on broadcast products held at once
    max_body_bytes: int = Field(64 << 10, ge=1024)  # request bodies over this get 413
    max_concurrent_runs: int = Field(0, ge=0)  # 0: derived from the cores
    torch_threads: int = Field(0, ge=0)  # per run; 0: derived from the cores
    queue_wait_s: float = Field(2.0, ge=0)  # a run that cannot start within this gets 503
    train_time_limit_s: float = Field(300.0, gt=0)  # a training stops (done) after this
    # the hard limit on a program's worker process (app/sandbox): its address space may grow
    # this much past its start; 0: the memory budget plus 256 MiB for torch itself
    worker_memory_bytes: int = Field(0, ge=0)
    # a run that has used this much CPU time (its own thread) is stopped between two ops or
    # chunks (422); 1.4x this of wall time stops it whatever the load (503, Retry-After)
    run_deadline_s: float = Field(3.0, gt=0)
    # connections (python -m app): a request must arrive whole within request_timeout_s of
    # its first byte (a silent socket: the same while over half max_connections are open,
    # else up to 60 s); a client that reads nothing of its response for send_timeout_s is
    # dropped; at most max_connections sockets at once (more get 503, then are dropped; kept
    # to half the open-file limit). A class of 40 browsers opens up to 6 sockets each.
    request_timeout_s: float = Field(5.0, gt=0)
    send_timeout_s: float = Field(10.0, gt=0)
    keep_alive_s: float = Field(5.0, gt=0)
    max_connections: int = Field(512, ge=1)
    # after a big run, once idle, hand the allocator's free memory back (glibc malloc_trim)
    release_memory: bool = True


@lru_cache
def get_settings() -> Settings:
    return Settings()
