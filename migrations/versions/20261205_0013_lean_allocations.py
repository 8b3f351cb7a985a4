"""allocations and their lines indexed for what reads them; lines without per-row foreign-key checks

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05 10:40:00

Allocation lines are append-only, written by ``payments.settlement`` in the
transaction that writes their allocation, and point at rows that are never
deleted; their foreign-key checks cost a query per line (two thirds of
writing one on PostgreSQL), and they are written in their allocation's order,
so a block-range index finds an allocation's lines on PostgreSQL. ``allocations.source`` and ``site_id`` were never
looked up by index; ``reverses_id`` is set only on refunds' reversals.
"""
from alembic import op
import sqlalchemy as sa


revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('allocation_lines', schema=None) as batch_op:
        batch_op.drop_constraint('fk_allocation_lines_allocation_id_allocations', type_='foreignkey')
        batch_op.drop_constraint('fk_allocation_lines_party_id_parties', type_='foreignkey')
        batch_op.drop_index('ix_allocation_lines_allocation_id')
        batch_op.create_index('ix_allocation_lines_allocation_id', ['allocation_id'], unique=False, postgresql_using='brin',
                              postgresql_with={'pages_per_range': 16, 'autosummarize': 'on'})
    with op.batch_alter_table('allocations', schema=None) as batch_op:
        batch_op.drop_index('ix_allocations_source')
        batch_op.drop_index('ix_allocations_site_id')
        batch_op.drop_index('ix_allocations_reverses_id')
        batch_op.create_index('ix_allocations_reverses_id', ['reverses_id'], unique=False,
                              postgresql_where=sa.text('reverses_id IS NOT NULL'), sqlite_where=sa.text('reverses_id IS NOT NULL'))


def downgrade() -> None:
    with op.batch_alter_table('allocations', schema=None) as batch_op:
        batch_op.drop_index('ix_allocations_reverses_id')
        batch_op.create_index('ix_allocations_reverses_id', ['reverses_id'], unique=False)
        batch_op.create_index('ix_allocations_site_id', ['site_id'], unique=False)
        batch_op.create_index('ix_allocations_source', ['source'], unique=False)
    with op.batch_alter_table('allocation_lines', schema=None) as batch_op:
        batch_op.drop_index('ix_allocation_lines_allocation_id')
        batch_op.create_index('ix_allocation_lines_allocation_id', ['allocation_id'], unique=False)
        batch_op.create_foreign_key('fk_allocation_lines_party_id_parties', 'parties', ['party_id'], ['id'])
        batch_op.create_foreign_key('fk_allocation_lines_allocation_id_allocations', 'allocations', ['allocation_id'], ['id'],
                                    ondelete='CASCADE')
