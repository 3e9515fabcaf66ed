"""One OS process of writers to a PostgreSQL store's event log, for ``test_store_postgres``.

Usage: ``python event_log_writer.py URL DEPLOYMENT_ID NAME WRITERS TRANSACTIONS``. Each of WRITERS
concurrent writers (one pool connection each) commits TRANSACTIONS transactions, one after the
other: verdicts with one event and plain appends of one to three events, mixed. Every event's
message is ``NAME/writer/transaction/index``. Prints how many events it committed.
"""

from __future__ import annotations

import asyncio
import sys

from broker.domain import model
from broker.store import port, postgres


async def main(url: str, deployment_id: str, name: str, writers: int, transactions: int) -> int:
    store = await postgres.Store.open(url, pool_size=writers)
    committed = 0
    try:
        deployment = await store.deployment_by_id(deployment_id)
        assert deployment is not None, deployment_id

        def event(w: int, t: int, i: int) -> model.DriftEvent:
            return model.DriftEvent.about(
                deployment, model.EventKind.REMEDIATION_FAILED, f"{name}/{w}/{t}/{i}", health=None
            )

        async def write(w: int) -> None:
            nonlocal committed
            for t in range(transactions):
                if t % 4 == 0:
                    written = await store.record_evaluations(
                        [
                            port.Verdict(
                                deployment,
                                items=(),
                                health=model.Health.HEALTHY,
                                phase=model.Phase.READY,
                                events=[event(w, t, 0)],
                            )
                        ]
                    )
                    assert written == [True], "the deployment moved on"
                    committed += 1
                else:
                    batch = [event(w, t, i) for i in range(1 + (w + t) % 3)]
                    await store.append_events(batch)
                    committed += len(batch)

        await asyncio.gather(*(write(w) for w in range(writers)))
    finally:
        await store.close()
    return committed


if __name__ == "__main__":
    url, deployment_id, name, writers, transactions = sys.argv[1:]
    print(asyncio.run(main(url, deployment_id, name, int(writers), int(transactions))))
