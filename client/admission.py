"""What a deployed site checks on every message before any work (before it loads its data).

First its policy (client/site_policy.py): a run that asks for more than the site allows is
declined. Then its teacher pin (client/teacher_pin.py): a run that did not start from the
pinned teacher at this site is refused (an evaluation-only run's message trains nothing and
starts from no teacher: a later training message of the same run is then refused by a pin).
Both are recorded in the run's journal (client/run_journal.py), which also counts the messages
of each kind, so that a coordinator cannot ask for more rounds than the policy allows by
numbering them as it likes. The first
admitted message of a run is recorded in the site's audit trail (client/site_audit.py). Simulated
sites (the coordinator's own partitions) are admitted as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import Context, Message

from client.run_journal import RunJournal
from client.site import SiteConfig
from client.site_audit import record_site_event
from client.site_policy import check_message_count, check_request
from client.teacher_pin import check_run_start
from common.protocol import EVALUATE_MODEL_MESSAGE_TYPE
from common.run_settings import FederatedRunConfig


def admit(
    msg: Message, context: Context, settings: FederatedRunConfig, site: SiteConfig
) -> RunJournal | None:
    """The run's journal once ``msg`` is admitted (None at a simulated site); SitePolicyError
    (declined) or IntegrityError (refused) otherwise, with nothing loaded or trained."""
    if site.simulated or site.policy is None:
        return None
    kind = msg.metadata.message_type
    config: dict[str, Any] = dict(msg.content.config_records.get("config", {})) if msg.has_content() else {}
    check_request(site.policy, settings, kind, config)
    journal = RunJournal.open(site.out_dir, context.run_id)
    if kind != EVALUATE_MODEL_MESSAGE_TYPE:  # an evaluation-only run starts from no teacher
        check_run_start(context.node_config, settings, journal, kind, config, lambda: _arrays(msg))
    first = journal.is_new
    check_message_count(site.policy, kind, journal.count(kind), context.run_id)
    if first:
        record_site_event(site.state_dir, "run-accepted", run_id=context.run_id)
    return journal


def _arrays(msg: Message) -> dict[str, torch.Tensor]:
    arrays = msg.content.array_records.get("arrays")
    return {} if arrays is None else arrays.to_torch_state_dict()
