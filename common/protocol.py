"""What server and sites agree on about messages, without importing Flower.

Error codes a site puts in its error replies (Flower's own codes are below 100), the message
type of the distillation round, and the keys of the records in replies.
"""

from __future__ import annotations

import re

SITE_DECLINED = 1001
"""The site declines the round (its differential-privacy budget would be exceeded)."""
SITE_BAD_INPUT = 1002
"""The site cannot take part: bad data or settings; the reason says what to fix."""
SITE_FAILED = 1003
"""An unexpected failure at the site."""

DISTILL_MESSAGE_TYPE = "train.distill"
STUDENT_ROUND_MESSAGE_TYPE = "train.student"
STUDENT_FINAL_MESSAGE_TYPE = "evaluate.student"
WEIGHT_KEY = "num-examples"
SITE_RECORD = "site"


_REASON = re.compile(r"^site '([^']*)': (.*)$", re.DOTALL)


def error_reason(site: str, text: str) -> str:
    """The reason of a site's error reply; it names the site (error replies carry no records)."""
    return f"site '{site}': {text}"


def parse_error_reason(reason: str) -> tuple[str | None, str]:
    """``(site, text)`` of a reason made by :func:`error_reason`; ``(None, reason)`` otherwise."""
    match = _REASON.match(reason)
    return (match.group(1), match.group(2)) if match else (None, reason)
