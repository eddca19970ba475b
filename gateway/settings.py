"""One validated settings tree, read from ``OMNIGATE_*`` environment variables.

Command-line options override the environment. A bad value stops start-up with a message
that names the setting (``OMNIGATE_PORT: ...``), never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "OMNIGATE_"
DEFAULT_FLOWS_DIR = Path(__file__).resolve().parent.parent / "examples" / "flows"


class SettingsError(Exception):
    """Settings failed validation; ``str()`` is a readable, multi-line explanation."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    data_dir: Path = Path(".omnigate")
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")

    # Store. Unset: start the embedded SecantusDB server in data_dir/db.
    mongodb_uri: str | None = None
    mongodb_db: str = Field("omnigate", pattern=r"^[A-Za-z0-9_-]{1,63}$")
    # Embedded store: fsync every commit so an acknowledged write survives a crash.
    embedded_sync_on_commit: bool = True

    # Bot: the directory with the bot's example file(s).
    flows_dir: Path = DEFAULT_FLOWS_DIR

    # Web chat
    webchat_allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webchat_max_frame_bytes: int = Field(65536, ge=1024, le=1024 * 1024)
    webchat_max_text: int = Field(4000, ge=1, le=100_000)

    # Outbox
    outbox_max_attempts: int = Field(8, ge=1, le=100)
    outbox_sweep_seconds: float = Field(2.0, gt=0, le=300)

    @field_validator("webchat_allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip().rstrip("/") for part in value.split(",") if part.strip()]
        return value

    @field_validator("webchat_allowed_origins")
    @classmethod
    def _check_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"{origin!r} is not an origin like https://shop.example.com")
        return value

    @model_validator(mode="after")
    def _frame_fits_text(self) -> Settings:
        # A text of max_text characters, each JSON-escaped as \uXXXX, must fit in a frame.
        needed = 6 * self.webchat_max_text + 1024
        if self.webchat_max_frame_bytes < needed:
            raise ValueError(
                f"OMNIGATE_WEBCHAT_MAX_FRAME_BYTES must be at least {needed} "
                "(6 x OMNIGATE_WEBCHAT_MAX_TEXT + 1024) so a maximal message fits in one frame"
            )
        return self

    @field_validator("mongodb_uri")
    @classmethod
    def _check_uri(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("mongodb://", "mongodb+srv://")):
            raise ValueError("must start with mongodb:// or mongodb+srv://")
        return value or None

    @field_validator("flows_dir")
    @classmethod
    def _check_flows_dir(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"{value} is not a directory")
        return value


def load_settings(**overrides: Any) -> Settings:
    """Read the environment, apply non-None ``overrides``, validate; raise SettingsError."""
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            if error["loc"]:
                name = ENV_PREFIX + str(error["loc"][0]).upper()
                lines.append(f"{name}: {error['msg']} (got {error.get('input')!r})")
            else:
                lines.append(str(error["msg"]).removeprefix("Value error, "))
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
