"""``/v1/plans``: the plan cache."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi import Path as PathParam

from autoq.cache import PlanCache
from service.routes.common import SettingsDep, errors, found
from service.schemas import PlanList, PlanSummary

router = APIRouter(prefix="/plans", tags=["plans"])

PLAN_KEY = r"^[A-Za-z0-9_-]{1,128}$"


@router.get("", response_model=PlanList, responses=errors(422))
def list_plans(
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,9}$",
                                        description="next_cursor of the previous page.")] = None,
) -> PlanList:
    """The plan cache, newest first: plans found so far, reused by jobs with the same model,
    data and budget."""
    entries = PlanCache(settings.plan_cache).list()
    start = int(cursor) if cursor else 0
    page = entries[start:start + limit]
    more = start + limit < len(entries)
    return PlanList(items=[PlanSummary(**entry) for entry in page],
                    next_cursor=str(start + limit) if more else None)


@router.get("/{key}", response_model=dict[str, Any], responses=errors(404, 422))
def get_plan(settings: SettingsDep,
             key: Annotated[str, PathParam(pattern=PLAN_KEY)]) -> dict[str, Any]:
    plan = found(PlanCache(settings.plan_cache).get(key), f"cached plan {key}")
    return plan.model_dump(mode="json")
