"""Messages between a consumer (ZeroMQ DEALER) and a producer (ROUTER), as multipart frames.

Every message is ``[kind, *parts]``; the ROUTER sees the consumer's routing id in front. Payloads
travel as their own part (zero-copy, never pickled); small fixed fields are packed with struct.

consumer -> producer
    PULL  transfer_id  <from_token u32, credits u32, max_frame_bytes u64,  stream the frames that
                        reader u16, readers u16, resume u32>  secret     hold tokens >= from_token,
                                                                        as reader i of n (the
                                                                        transfer ends when all n
                                                                        are DONE or CANC), from
                                                                        the resume-th on
    CRED  transfer_id  <credits u32>                                    the consumer read that many
    DONE  transfer_id                                                   all read: free the buffers
    CANC  transfer_id                                                   abandoned: free the buffers
    PING                                                                heartbeat, renews leases
    BGET  <digest u64>                                                  send the basis named so
producer -> consumer
    DATA  transfer_id  <seq u32>  frame                                 seq counts this reader's frames
    END   transfer_id  <frames u32>                                     no frame after seq frames-1
    ERR   transfer_id  <code u8>  message (utf-8)
    PONG  epoch (16 random bytes, new at every producer start)
    BSET  <digest u64>  basis file (safetensors)                        a basis it published
    BERR  <digest u64>  message (utf-8)                                 it has no such basis

A transfer is bound to its readers: a PULL must carry the transfer's secret (`SECRET_BYTES`, made
with its id and carried in the requests' ``kv_transfer_params``), and the first PULL of a reader
index binds it to that connection (and, with CURVE, to the consumer's public key). CRED, DONE and
CANC count only from the connection a reader is bound to; a PULL with the secret (and the same
key) moves a reader to a new connection, resuming after the frames it already holds: a consumer
whose connection was reset re-sends its PULLs so.
"""

import struct

PULL, CRED, DONE, CANC, PING, BGET = b"PULL", b"CRED", b"DONE", b"CANC", b"PING", b"BGET"
DATA, END, ERR, PONG, BSET, BERR = b"DATA", b"END", b"ERR", b"PONG", b"BSET", b"BERR"

PULL_ARGS = struct.Struct("<IIQHHI")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
ERR_CODE = struct.Struct("<B")
SECRET_BYTES = 16

MAX_PARTS = 5  # parts of any message, the ROUTER's routing id included: a PULL has that many
MAX_CONTROL_PART = 1024  # bytes of any part a producer accepts (CURVE's handshake commands too)

# How a transfer ended; sent as ERR codes (COMPLETED is only recorded, never sent).
COMPLETED, REFUSED, CANCELLED, EVICTED, TOO_LARGE = 0, 1, 2, 3, 4
