"""Checkpoints know why they were taken: `kind` is "epoch" (one per epoch, as OpenAI lists them) or "step"
(every `checkpoint_every` steps, or a pause), so retention can keep the last epochs and the newest step.

Revision ID: 0002
Revises: 0001

"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # Rows from before this revision were all taken by step count.
    op.add_column('checkpoints', sa.Column('kind', sa.String(length=8), nullable=False, server_default='step'))


def downgrade() -> None:
    op.drop_column('checkpoints', 'kind')
