"""Cursor pagination over a table's growing integer `pk`: `after=<public id>` becomes one indexed comparison."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from api.core.errors import InvalidParameter

Row = TypeVar("Row")
Order = Literal["asc", "desc"]


@dataclass
class Page(Generic[Row]):
    items: list[Row]
    has_more: bool


def paginate(
    session: Session,
    table: type[Row],
    *filters: ColumnElement[bool],
    after: str | None = None,
    limit: int = 20,
    order: Order = "desc",
) -> Page[Row]:
    """One page of `table` rows matching `filters`, after the row whose public id is `after`.

    The cursor is looked up under the same filters, so another organization's id is just unknown here.
    """
    table_: Any = table
    stmt = select(table_).where(*filters)
    if after is not None:
        after_pk = session.scalar(select(table_.pk).where(*filters, table_.id == after))
        if after_pk is None:
            raise InvalidParameter(f"No such object to page after: '{after}'.", param="after")
        stmt = stmt.where(table_.pk < after_pk if order == "desc" else table_.pk > after_pk)
    stmt = stmt.order_by(table_.pk.desc() if order == "desc" else table_.pk.asc()).limit(limit + 1)
    rows = list(session.scalars(stmt))
    # One row more than asked for tells whether a next page exists without a count query.
    return Page(items=rows[:limit], has_more=len(rows) > limit)
