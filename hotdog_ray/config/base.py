"""The base of every config section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: unknown keys are errors, and assignments are validated too."""

    # extra="forbid" is what turns a typo in a preset into an error instead of a silent default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
