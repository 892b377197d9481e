"""Store operations that every backend implements the same way: as one built-in script."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gemini_scale.stores.base import Script, ScriptArg, check_amount, ttl_ms
from gemini_scale.stores.scripts import ADD_TO_SET, INCR_WITH_TTL


class ScriptedOperations:
    """``incr`` and ``add_to_set`` on top of a backend's ``run`` (Lua on Redis, the Python
    twin in memory), so both backends share one definition of their semantics."""

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[ScriptArg]) -> Any:
        raise NotImplementedError

    async def incr(self, key: str, amount: int = 1, *, ttl: float) -> int:
        """Add ``amount`` to the counter; the TTL is set only when it is created.

        Runs :data:`~gemini_scale.stores.scripts.INCR_WITH_TTL`; results are exact up to
        ``2**53`` (Lua numbers are doubles).
        """
        check_amount(amount)
        result: int = await self.run(INCR_WITH_TTL, [key], [amount, ttl_ms(ttl)])
        return result

    async def add_to_set(self, key: str, *members: str, ttl: float) -> None:
        """Add ``members`` to a set; its TTL becomes ``max(remaining TTL, ttl)``."""
        ms = ttl_ms(ttl)
        if members:
            await self.run(ADD_TO_SET, [key], [ms, *members])
