"""Where simulation/study*.py find the ``--source``/``--data`` loaders (common/data/source_pairs.py).

Kept only for the study modules, which are moving out of the app (issue 26 item 3); new code
imports common.data.source_pairs.
"""

from common.data.source_pairs import drop_duplicate_images, load_sources, parse_source_options

__all__ = ["drop_duplicate_images", "load_sources", "parse_source_options"]
