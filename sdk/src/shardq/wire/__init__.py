"""shardq.wire: what every process shares on the wire (DESIGN §1).

The protocol codec and its validators (``protocol``), the job model (``job``), slots
(``slots``), the topology (``topology``) and line framing (``framing``). Pure: no I/O, no
server code; a client-only install runs it with orjson alone.
"""
