"""Messages between a consumer (ZeroMQ DEALER) and a producer (ROUTER), as multipart frames.

Every message is ``[kind, *parts]``; the ROUTER sees the consumer's routing id in front. Payloads
travel as their own part (zero-copy, never pickled); small fixed fields are packed with struct.

consumer -> producer
    PULL  transfer_id  <from_token u32, credits u32, max_frame_bytes u64,  stream the frames that
                        reader u16, readers u16>                        hold tokens >= from_token,
                                                                        as reader i of n (the
                                                                        transfer ends when all n
                                                                        are DONE or CANC)
    CRED  transfer_id  <credits u32>                                    the consumer read that many
    DONE  transfer_id                                                   all read: free the buffers
    CANC  transfer_id                                                   abandoned: free the buffers
    PING                                                                heartbeat, renews leases
    BGET  <digest u64>                                                  send the basis named so
producer -> consumer
    DATA  transfer_id  <seq u32>  frame                                 seq counts this PULL's frames
    END   transfer_id  <frames u32>                                     no frame after seq frames-1
    ERR   transfer_id  <code u8>  message (utf-8)
    PONG  epoch (16 random bytes, new at every producer start)
    BSET  <digest u64>  basis file (safetensors)                        a basis it published
    BERR  <digest u64>  message (utf-8)                                 it has no such basis
"""

import struct

PULL, CRED, DONE, CANC, PING, BGET = b"PULL", b"CRED", b"DONE", b"CANC", b"PING", b"BGET"
DATA, END, ERR, PONG, BSET, BERR = b"DATA", b"END", b"ERR", b"PONG", b"BSET", b"BERR"

PULL_ARGS = struct.Struct("<IIQHH")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
ERR_CODE = struct.Struct("<B")

MAX_CONTROL_MESSAGE = 1024  # bytes of any part a producer accepts: consumers send only control

# How a transfer ended; sent as ERR codes (COMPLETED is only recorded, never sent).
COMPLETED, REFUSED, CANCELLED, EVICTED, TOO_LARGE = 0, 1, 2, 3, 4
