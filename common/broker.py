"""The embedded default's broker: Celery's filesystem transport, with messages that appear whole.

kombu's filesystem transport writes a message file in place, while a consumer may already
move and read it: a half-written file is read as an empty message (dropped) or as broken
JSON (the worker stops). Here a message is written under a name no consumer looks at and
renamed into place, so a consumer sees it whole or not at all.
"""
from __future__ import annotations

import os
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        # ".part" keeps it out of the consumer's view ("<id>.<queue>.msg" only) until the rename.
        partial = final + ".part"
        try:
            with open(partial, "wb") as handle:
                handle.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"cannot add a message to queue {queue!r}") from exc


class Transport(filesystem.Transport):
    Channel = Channel
