"""Serving replicas register here: one row per replica, rewritten by its heartbeat, read by the API's router.

Revision ID: 0003
Revises: 0002

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        'serving_replicas',
        sa.Column('pk', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('url', sa.String(length=512), nullable=False),
        sa.Column('engine', sa.String(length=16), nullable=False),
        sa.Column('device', sa.String(length=32), nullable=False),
        sa.Column('servable_bases', sa.JSON(), nullable=False),
        sa.Column('loaded_bases', sa.JSON(), nullable=False),
        sa.Column('adapters', sa.JSON(), nullable=False),
        sa.Column('max_adapters', sa.Integer(), nullable=False),
        sa.Column('max_lora_rank', sa.Integer(), nullable=True),
        sa.Column('free_memory_bytes', sa.BigInteger(), nullable=True),
        sa.Column('in_flight', sa.Integer(), nullable=False),
        sa.Column('started_at', sa.Float(), nullable=False),
        sa.Column('beat_at', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('pk'),
        sa.UniqueConstraint('id'),
    )
    op.create_index(op.f('ix_serving_replicas_beat_at'), 'serving_replicas', ['beat_at'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_serving_replicas_beat_at'), table_name='serving_replicas')
    op.drop_table('serving_replicas')
