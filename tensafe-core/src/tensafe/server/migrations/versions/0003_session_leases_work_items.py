"""Session leases and work items, for several replicas over one database.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "session_leases",
        sa.Column("session_id", sa.String(length=32), nullable=False),
        sa.Column("owner", sa.String(length=32), nullable=False),
        sa.Column("token", sa.Integer(), nullable=False),
        sa.Column("expires", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"]),
        sa.PrimaryKeyConstraint("session_id"),
    )
    op.create_table(
        "work_items",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("future_id", sa.String(length=32), nullable=False),
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("session_id", sa.String(length=32), nullable=False),
        sa.Column("operation", sa.String(length=32), nullable=False),
        sa.Column("request", sa.Text(), nullable=False),
        sa.Column("taken_by", sa.String(length=32), nullable=True),
        sa.ForeignKeyConstraint(["future_id"], ["futures.id"]),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"]),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("future_id"),
    )
    op.create_index(op.f("ix_work_items_session_id"), "work_items", ["session_id"], unique=False)
    op.create_index(op.f("ix_work_items_tenant_id"), "work_items", ["tenant_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_work_items_tenant_id"), table_name="work_items")
    op.drop_index(op.f("ix_work_items_session_id"), table_name="work_items")
    op.drop_table("work_items")
    op.drop_table("session_leases")
