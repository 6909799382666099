"""What server and sites agree on about messages, without importing Flower.

Error codes a site puts in its error replies (Flower's own codes are below 100), the message
type of the distillation round, and the keys of the records in replies.
"""

from __future__ import annotations

SITE_DECLINED = 1001
"""The site declines the round (its differential-privacy budget would be exceeded)."""
SITE_BAD_INPUT = 1002
"""The site cannot take part: bad data or settings; the reason says what to fix."""
SITE_FAILED = 1003
"""An unexpected failure at the site."""

DISTILL_MESSAGE_TYPE = "train.distill"
WEIGHT_KEY = "num-examples"
SITE_RECORD = "site"
