"""The broker's floor for scenario 5: a bare aio-pika consumer that answers every command at once.

Same broker work as the launcher per command (quorum queue, persistent reply with publisher
confirm, ack after the reply), no validation, no hub. ``python -m benchmarks.echo QUEUE PREFETCH``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import aio_pika


async def main(queue_name: str, prefetch: int) -> None:
    connection = await aio_pika.connect_robust(os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    channel = await connection.channel(publisher_confirms=True)
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})

    async def echo(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await channel.default_exchange.publish(
            aio_pika.Message(
                b'{"ok": true, "action": "read", "result": {}}',
                content_type="application/json",
                correlation_id=message.correlation_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=message.reply_to or "",
        )
        await message.ack()

    await queue.consume(echo)
    print("consuming", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await connection.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
