"""The ``promote`` flow: move the registry alias ``champion`` to a model version only if it passes the gate.

Gate: ``pruned_ppl <= max_ppl_ratio x dense_ppl``, both read from the version's tags (written at registration).
``max_ppl_ratio`` defaults to the ``output.promote_max_ppl_ratio`` of the recipe that produced the version (its
``promote_max_ppl_ratio`` tag), for a version without that tag to the config's default.
A refused promotion leaves the alias where it was and ends the flow run in a Failed state named ``Refused`` whose
message is the reason (what the Prefect UI and ``prefect deployment run --watch`` show); calling the flow then
raises :class:`PromotionRefused`, which carries the result (``promote_flow(..., return_state=True)`` gives the
state).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.states import Failed

from surgeon.config import OutputSection
from tasks import reporting, tracking

__all__ = ["promote_flow", "gate", "PromotionRefused", "REFUSED"]

REFUSED = "Refused"  # the name of a refused promotion's final state

DEFAULT_MAX_PPL_RATIO = OutputSection.model_fields["promote_max_ppl_ratio"].default


class PromotionRefused(Exception):
    """The gate refused the version; ``.result`` is the flow's result dict (reason, previous alias target)."""

    def __init__(self, reason: str, result: dict):
        super().__init__(reason, result)
        self.reason, self.result = reason, result

    def __str__(self) -> str:
        return f"promotion refused: {self.reason}"


def gate(tags: dict, max_ppl_ratio: float) -> tuple[bool, str]:
    """(passed, reason) for a version's tags."""
    try:
        dense, pruned = float(tags["dense_ppl"]), float(tags["pruned_ppl"])
    except (KeyError, TypeError, ValueError):
        return False, "the version has no dense_ppl/pruned_ppl tags (prune with eval.data set to measure them)"
    limit = max_ppl_ratio * dense
    verdict = "<=" if pruned <= limit else ">"
    return pruned <= limit, (f"pruned ppl {pruned:.3f} {verdict} {max_ppl_ratio:g} x dense ppl {dense:.3f} = "
                             f"{limit:.3f} (ratio {pruned / dense:.3f})")


@flow(name="promote")
def promote_flow(model_name: str, version: int | str, max_ppl_ratio: float | None = None,
                 alias: str = tracking.ALIAS):
    """Point ``alias`` at ``model_name`` version ``version`` if its perplexity passes the gate."""
    log = get_run_logger()
    mv = tracking.model_version(model_name, str(version))
    ratio = max_ppl_ratio if max_ppl_ratio is not None else \
        float(mv["tags"].get("promote_max_ppl_ratio", DEFAULT_MAX_PPL_RATIO))
    passed, reason = gate(mv["tags"], ratio)
    previous = tracking.alias_version(model_name, alias)
    if passed:
        tracking.set_alias(model_name, str(version), alias)
    tracking.set_version_tags(model_name, str(version), {"promotion_gate": "passed" if passed else "refused",
                                                         "promotion_reason": reason})
    log.info("%s v%s: %s; %s", model_name, version, "passed" if passed else "refused", reason)
    reporting.promotion_summary(reporting.artifact_key("promote", model_name), name=model_name, version=str(version),
                                passed=passed, reason=reason, alias=alias)
    result = {"model_name": model_name, "version": str(version), "passed": passed, "reason": reason,
              "max_ppl_ratio": ratio, "alias": alias, "previous": previous,
              "current": str(version) if passed else previous}
    if not passed:
        return Failed(name=REFUSED, message=f"{REFUSED}: {reason}", data=PromotionRefused(reason, result))
    return result
