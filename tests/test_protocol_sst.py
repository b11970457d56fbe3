"""The SST conversation of protocol.Connection: SST_REQUEST, SST_BEGIN, SST_CHUNK..., SST_END (or SST_REFUSED)."""

from __future__ import annotations

import hashlib
import uuid

import pytest

from istd.errors import LocalProtocolError, RemoteProtocolError
from protocol import Connection as IstConnection
from protocol import (
    ConnectionClosed,
    Keepalive,
    Role,
    SstBegin,
    SstChunk,
    SstEnd,
    SstRefused,
    SstRequest,
    State,
)
from protocol.wire import FrameType
from tests.test_protocol import HANDSHAKE, expect_remote, feed, raw_frame

U = uuid.UUID("0ba80362-e6b2-11f1-a838-fff90686b220")
DATA = bytes(range(256)) * 40


def requested() -> tuple[IstConnection, IstConnection]:
    joiner, donor = IstConnection(Role.JOINER), IstConnection(Role.DONOR)
    request = SstRequest("node3", b"token")
    assert feed(donor, joiner.send(request)) == [request]
    assert donor.state is joiner.state is State.SST_WAIT
    assert donor.sst_request == request
    return joiner, donor


def begun(total: int = len(DATA)) -> tuple[IstConnection, IstConnection]:
    joiner, donor = requested()
    begin = SstBegin(U, 1234, total)
    assert feed(joiner, donor.send(begin)) == [begin]
    assert joiner.sst_begin == begin and joiner.state is State.SST_STREAMING
    return joiner, donor


@pytest.mark.parametrize("chunk", [None, 1, 7, 4096])
def test_a_whole_snapshot_in_chunks_of_any_size(chunk: int | None) -> None:
    joiner, donor = begun()
    wire = b"".join(donor.send(SstChunk(DATA[i : i + 1000])) for i in range(0, len(DATA), 1000))
    wire += donor.send(Keepalive()) + donor.send(SstEnd(hashlib.sha256(DATA).digest()))
    events = feed(joiner, wire, chunk)
    assert b"".join(bytes(e.data) for e in events if isinstance(e, SstChunk)) == DATA
    assert events[-1] == SstEnd(hashlib.sha256(DATA).digest())
    assert joiner.state is donor.state is State.DONE
    assert joiner.sst_bytes == donor.sst_bytes == len(DATA)
    joiner.receive_data(b"")
    assert joiner.next_event() == ConnectionClosed()


def test_an_empty_snapshot_is_just_begin_and_end() -> None:
    joiner, donor = begun(0)
    assert feed(joiner, donor.send(SstEnd(hashlib.sha256().digest()))) == [SstEnd(hashlib.sha256().digest())]
    assert joiner.state is State.DONE


def test_a_refusal_ends_the_conversation() -> None:
    joiner, donor = requested()
    refusal = SstRefused("this donor keeps no state (applier none): it cannot serve SST")
    assert feed(joiner, donor.send(refusal)) == [refusal]
    assert joiner.state is donor.state is State.REFUSED
    with pytest.raises(LocalProtocolError, match="may not send SST_CHUNK in state REFUSED"):
        donor.send(SstChunk(b"x"))


def test_the_donor_cannot_send_more_or_less_than_it_announced() -> None:
    _, donor = begun(10)
    with pytest.raises(LocalProtocolError, match="runs past the snapshot's 10 bytes"):
        donor.send(SstChunk(bytes(11)))
    donor.send(SstChunk(bytes(4)))
    with pytest.raises(LocalProtocolError, match="SST ended after 4 of 10 bytes"):
        donor.send(SstEnd(bytes(32)))
    assert donor.state is State.SST_STREAMING and donor.sst_bytes == 4


def test_a_chunk_past_the_size_is_rejected_from_its_header() -> None:
    joiner, _ = begun(10)
    # the length in the header alone condemns it: the 11 bytes are never buffered
    frame = raw_frame(FrameType.SST_CHUNK, bytes(11))
    expect_remote(joiner, frame[:24], "runs past the snapshot's 10 bytes")


def test_an_early_end_is_rejected_on_receipt() -> None:
    joiner, _ = begun(10)
    expect_remote(joiner, raw_frame(FrameType.SST_END, bytes(32)), "SST ended after 0 of 10 bytes")


@pytest.mark.parametrize(
    ("event", "match"),
    [
        (SstBegin(U, -1, 10), "SstBegin.seqno must be a position"),
        (SstBegin(U, 5, -1), "is not a size"),
        (SstEnd(b"short"), "must carry a 32-byte sha256"),
    ],
)
def test_bad_fields_are_refused_on_send(event: SstBegin | SstEnd, match: str) -> None:
    _, donor = requested() if isinstance(event, SstBegin) else begun(0)
    with pytest.raises(LocalProtocolError, match=match):
        donor.send(event)


def test_sst_frames_are_only_for_an_sst_conversation() -> None:
    joiner, donor = IstConnection(Role.JOINER), IstConnection(Role.DONOR)
    feed(donor, joiner.send(HANDSHAKE))
    with pytest.raises(LocalProtocolError, match="may not send SST_BEGIN in state RESPONSE"):
        donor.send(SstBegin(U, 1, 1))
    expect_remote(joiner, raw_frame(FrameType.SST_CHUNK, b"x"), "DONOR may not send SST_CHUNK in state RESPONSE")
    joiner2, _ = requested()
    with pytest.raises(LocalProtocolError, match="may not send HANDSHAKE in state SST_WAIT"):
        joiner2.send(HANDSHAKE)
    with pytest.raises(LocalProtocolError, match="DONOR may not send SST_REQUEST in state HANDSHAKE"):
        IstConnection(Role.DONOR).send(SstRequest("x"))


def test_a_malformed_begin_is_a_remote_error() -> None:
    joiner, _ = requested()
    expect_remote(joiner, raw_frame(FrameType.SST_BEGIN, b"ISTD" + bytes(5)), "malformed SST_BEGIN payload")


def test_a_corrupt_chunk_fails_its_checksum() -> None:
    joiner, donor = begun(4)
    frame = bytearray(donor.send(SstChunk(b"abcd")))
    frame[-1] ^= 0xFF
    with pytest.raises(RemoteProtocolError, match="checksum mismatch"):
        feed(joiner, bytes(frame))
