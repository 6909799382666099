"""The wording of the progress lines the ServerApp logs for people.

:func:`round_line`, :func:`validation_line`, :func:`resume_line`, :func:`start_line`,
:func:`distill_line` and :func:`student_round_line` word each step of a run; the step itself
travels as a structured event (server/progress_events.py), which is what every follower reads:
no code parses these lines back.
"""

from __future__ import annotations

from pathlib import Path

RESUME_ADVICE = (
    "The last completed round is checkpointed; start the server again with --resume once sites are back."
)
"""What a failed round tells the coordinator (a simulation drops it: there is no server to resume)."""


def round_line(
    server_round: int,
    num_rounds: int,
    trained: int,
    sampled: int,
    train_loss: float,
    metric_name: str,
    metric: float | None,
    best_round: int,
    seconds: float,
) -> str:
    """A teacher round's line; ``metric`` None: the round's model is validated later (in-train mode)."""
    validated = "" if metric is None else f", val {metric_name} {metric:.4f} (best round {best_round})"
    return (
        f"Round {server_round}/{num_rounds}: {trained}/{sampled} sites trained, train loss {train_loss:.4f}"
        f"{validated}, {seconds:.1f} s"
    )


def validation_line(
    server_round: int, num_rounds: int, sites: int, metric_name: str, metric: float, best_round: int
) -> str:
    """A teacher round's validation (in in-train mode it arrives with the next round's replies)."""
    return (
        f"Round {server_round}/{num_rounds} validation: {sites} site(s), {metric_name} {metric:.4f} "
        f"(best round {best_round})"
    )


def resume_line(
    run_dir: Path, completed: int, num_rounds: int, best_round: int, metric_name: str, best_metric: float
) -> str:
    return (
        f"Resuming run in {run_dir} after round {completed} of {num_rounds} "
        f"(best so far: round {best_round}, {metric_name} = {best_metric:.4f})"
    )


def start_line(images: int, epochs: int) -> str:
    """The coordinator starts distilling the students' start (its images count as ``replied``)."""
    return f"Students' start: distilling the teacher on {images} public images ({epochs} epochs)"


def distill_line(which: str) -> str:
    return f"Distillation round: sending the {which} global teacher to every site"


def student_round_line(student_round: int, num_rounds: int, sites: int, seconds: float) -> str:
    """A federated-student round's line (``sites``: those whose student was aggregated)."""
    return f"Federated student round {student_round}/{num_rounds}: {sites} sites, {seconds:.1f} s"


def without_resume_advice(text: str) -> str:
    """``text`` without :data:`RESUME_ADVICE` (for runs that cannot be resumed, e.g. simulations)."""
    return " ".join(text.replace(RESUME_ADVICE, "").split())
