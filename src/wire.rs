//! Frames on a Unix stream socket: the one framing of every message of a fork.
//!
//! A forked VM's state, memory and answers cross a socket pair between two processes
//! that do not trust each other's bytes ([`crate::fork`] says which messages, in what
//! order). Each message is one frame:
//!
//! | bytes | what |
//! |---|---|
//! | 0..4 | the message's [`Kind`], little-endian u32 |
//! | 4..8 | how many fds follow the payload, little-endian u32 |
//! | 8..16 | payload length in bytes, little-endian u64 |
//! | 16.. | the payload |
//!
//! then the fds, passed with `SCM_RIGHTS` in batches of at most [`FDS_PER_BATCH`], each
//! batch riding on one byte of payload. The receiver names the kinds it expects and
//! checks the header against each kind's bounds ([`Kind::max_len`], [`Kind::max_fds`])
//! before it allocates or reads anything more. A peer that closes mid-frame is an
//! [`Error::Closed`] naming where; a read timeout set on the socket
//! (`UnixStream::set_read_timeout`) is an [`Error::TimedOut`], never a hang.
//!
//! This module knows nothing of what the payloads mean.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// Fds passed per `sendmsg`: below the kernel's `SCM_MAX_FD` (253).
pub const FDS_PER_BATCH: usize = 200;

/// Bytes of a frame header.
pub const HEADER_LEN: usize = 16;

/// The largest payload of any kind: a memory manifest whose regions have the most
/// extents a layered image keeps fits easily.
pub const MAX_LEN: u64 = 64 << 20;

/// The most fds one frame may carry: far more files than a memory is ever made of
/// (every region's file, layers and patches), and than one region list has regions.
pub const MAX_FDS: u32 = 4096;

/// What a frame holds; the receiver refuses a kind it does not expect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The fork's `Hello`: the child's name and the parent's state.
    Hello = 1,
    /// A memory manifest, with the memfds it indexes.
    Manifest = 2,
    /// A lazily filled child's regions, with one userfaultfd each.
    HandBack = 3,
    /// The child's answer: running, or why not.
    Ready = 4,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Hello, Kind::Manifest, Kind::HandBack, Kind::Ready];

    fn from_u32(v: u32) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| *k as u32 == v)
    }

    /// The longest payload accepted for this kind.
    pub fn max_len(self) -> u64 {
        match self {
            Kind::Hello | Kind::Manifest => MAX_LEN,
            Kind::HandBack | Kind::Ready => 1 << 20,
        }
    }

    /// The most fds accepted with this kind.
    pub fn max_fds(self) -> u32 {
        match self {
            Kind::Hello | Kind::Ready => 0,
            Kind::Manifest | Kind::HandBack => MAX_FDS,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Hello => "hello",
            Kind::Manifest => "memory manifest",
            Kind::HandBack => "userfaultfd hand-back",
            Kind::Ready => "ready",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A frame's header, checked against its kind's bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub fds: u32,
    pub len: u64,
}

impl Header {
    /// The header as sent.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(&(self.kind as u32).to_le_bytes());
        b[4..8].copy_from_slice(&self.fds.to_le_bytes());
        b[8..].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Reads a header, refusing a kind not in `expect` and a length or fd count beyond
    /// its kind's bounds.
    pub fn decode(b: &[u8; HEADER_LEN], expect: &[Kind]) -> Result<Header, Error> {
        let word = |r: std::ops::Range<usize>| u32::from_le_bytes(b[r].try_into().expect("4 bytes"));
        let raw = word(0..4);
        let fds = word(4..8);
        let len = u64::from_le_bytes(b[8..].try_into().expect("8 bytes"));
        let kind = Kind::from_u32(raw).ok_or(Error::UnknownKind(raw))?;
        if !expect.contains(&kind) {
            return Err(Error::Unexpected { got: kind, expected: Expected(expect.to_vec()) });
        }
        if len > kind.max_len() {
            return Err(Error::TooLarge { kind, len, max: kind.max_len() });
        }
        if fds > kind.max_fds() {
            return Err(Error::TooManyFds { kind, fds, max: kind.max_fds() });
        }
        Ok(Header { kind, fds, len })
    }
}

/// One received frame.
#[derive(Debug)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// The kinds a receiver expected, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected(pub Vec<Kind>);

impl std::fmt::Display for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, k) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" or ")?;
            }
            write!(f, "{k}")?;
        }
        Ok(())
    }
}

/// Why a frame could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the peer closed the socket {during}")]
    Closed { during: String },
    #[error("no frame within the socket's read timeout: the peer is stuck or gone")]
    TimedOut,
    #[error("socket: {0}")]
    Io(std::io::Error),
    #[error("a frame of unknown kind {0} (not a vmfork fork message, or another version's)")]
    UnknownKind(u32),
    #[error("a {got} frame where a {expected} frame was expected")]
    Unexpected { got: Kind, expected: Expected },
    #[error("a {kind} frame of {len} bytes, more than the {max} allowed")]
    TooLarge { kind: Kind, len: u64, max: u64 },
    #[error("a {kind} frame with {fds} fds, more than the {max} allowed")]
    TooManyFds { kind: Kind, fds: u32, max: u32 },
    #[error("a {kind} frame's fds: {what}")]
    BadFds { kind: Kind, what: String },
}

fn io(e: std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Error::TimedOut,
        _ => Error::Io(e),
    }
}

/// Sends one frame: `payload`, then `fds`.
pub fn send(sock: &UnixStream, kind: Kind, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), Error> {
    let header =
        Header { kind, fds: u32::try_from(fds.len()).unwrap_or(u32::MAX), len: payload.len() as u64 };
    // The sender checks its own frame as the receiver will: a frame too big fails here,
    // saying so, instead of as a refusal at the other end.
    Header::decode(&header.encode(), &[kind])?;
    let mut w = sock;
    w.write_all(&header.encode()).map_err(io)?;
    w.write_all(payload).map_err(io)?;
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    for batch in raw.chunks(FDS_PER_BATCH) {
        let cmsg = [ControlMessage::ScmRights(batch)];
        sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(&[0])], &cmsg, MsgFlags::empty(), None)
            .map_err(|e| io(e.into()))?;
    }
    Ok(())
}

/// Receives one frame of one of the kinds in `expect`.
pub fn recv(sock: &UnixStream, expect: &[Kind]) -> Result<Frame, Error> {
    let mut r = sock;
    let mut header = [0u8; HEADER_LEN];
    read_all(&mut r, &mut header, "before a whole frame header")?;
    let h = Header::decode(&header, expect)?;
    // Grown as the bytes arrive: a header alone never makes us allocate its length.
    let mut payload = Vec::new();
    let got = (&mut r).take(h.len).read_to_end(&mut payload).map_err(io)?;
    if got as u64 != h.len {
        return Err(Error::Closed {
            during: format!("after {got} bytes of a {} frame's payload of {}", h.kind, h.len),
        });
    }
    let want = h.fds as usize;
    let mut fds: Vec<OwnedFd> = Vec::with_capacity(want);
    let mut space = nix::cmsg_space!([RawFd; FDS_PER_BATCH]);
    while fds.len() < want {
        let mut byte = [0u8; 1];
        let mut iov = [IoSliceMut::new(&mut byte)];
        let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(|e| io(e.into()))?;
        let (bytes, truncated) = (msg.bytes, msg.flags.contains(MsgFlags::MSG_CTRUNC));
        let before = fds.len();
        for c in msg.cmsgs().map_err(|e| io(e.into()))? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these fds in our table, for us alone;
                // nothing else owns them.
                fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        if bytes == 0 {
            return Err(Error::Closed {
                during: format!("after {before} of a {} frame's {want} fds", h.kind),
            });
        }
        let bad = |what: String| Error::BadFds { kind: h.kind, what };
        if truncated {
            return Err(bad(format!("a batch of more than {FDS_PER_BATCH} fds (the kernel dropped some)")));
        }
        if fds.len() == before {
            return Err(bad(format!("after {before} of {want}, a byte without fds")));
        }
        if fds.len() > want {
            return Err(bad(format!("{} fds, the header said {want}", fds.len())));
        }
    }
    Ok(Frame { kind: h.kind, payload, fds })
}

/// `read_exact`, with an early end of stream said as where it happened.
fn read_all(r: &mut impl Read, buf: &mut [u8], during: &str) -> Result<(), Error> {
    match r.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(Error::Closed { during: during.to_string() })
        }
        Err(e) => Err(io(e)),
    }
}

/// The check behind the `wire_frame` fuzz target (`fuzz/fuzz_targets/`), also run over
/// its committed corpus by `tests/snapshot_corpora.rs`. Not an API.
pub mod fuzzing {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use super::{Error, HEADER_LEN, Header, Kind, recv};

    /// A fuzz target's check (the same type as `snapshot::fuzzing::Check`, which this
    /// module, depending on nothing else of the crate, does not name).
    pub type Check = fn(&[u8]);

    /// Each fuzz target's name (its directory under `fuzz/corpus/`) and its check.
    pub const TARGETS: &[(&str, Check)] = &[("wire_frame", frame)];

    /// Inputs longer than this are cut: the check writes the input into a socket before
    /// reading it, and the socket's buffer must hold it all.
    pub const MAX_INPUT: usize = 32 << 10;

    /// The input (cut to [`MAX_INPUT`] bytes) as everything a peer wrote before it closed
    /// its end, no fds passed, read by [`recv`] expecting any kind: nothing panics or
    /// hangs; a frame is received exactly when the header decodes, announces no fds and
    /// no more payload than the input holds, and then it is the input's next bytes; a
    /// header that fails to decode is refused as [`Header::decode`] refuses it; every
    /// refusal says why.
    pub fn frame(b: &[u8]) {
        let b = &b[..b.len().min(MAX_INPUT)];
        let (mut tx, rx) = UnixStream::pair().expect("a socket pair");
        rx.set_read_timeout(Some(Duration::from_secs(5))).expect("a read timeout");
        tx.write_all(b).expect("the input fits the socket's buffer");
        drop(tx);
        let got = recv(&rx, &Kind::ALL);
        let header = b.get(..HEADER_LEN).map(|h| Header::decode(h.try_into().expect("16 bytes"), &Kind::ALL));
        match (&got, header) {
            (Ok(f), Some(Ok(h))) => {
                assert_eq!((f.kind, h.fds), (h.kind, 0), "a frame with fds though none were passed");
                assert_eq!(&b[HEADER_LEN..HEADER_LEN + f.payload.len()], &f.payload[..]);
                assert_eq!(f.payload.len() as u64, h.len);
            }
            (Ok(_), _) => panic!("a frame received from a header that does not decode"),
            (Err(e), Some(Ok(h))) => {
                let whole = b.len() as u64 >= HEADER_LEN as u64 + h.len;
                assert!(h.fds > 0 || !whole, "a whole frame without fds refused: {e}");
                // Announced fds never come: the close ends the wait, or the next bytes
                // arrive without them.
                let fds_missing = whole && matches!(e, Error::BadFds { .. });
                assert!(matches!(e, Error::Closed { .. }) || fds_missing, "a decoded header, then {e}");
            }
            (Err(e), Some(Err(d))) => assert_eq!(e.to_string(), d.to_string()),
            (Err(e), None) => assert!(matches!(e, Error::Closed { .. }), "a short header, then {e}"),
        }
        if let Err(e) = got {
            assert!(!e.to_string().is_empty(), "refused without a reason");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::time::{Duration, Instant};

    use super::*;

    fn memfd(name: &str) -> OwnedFd {
        nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap()
    }

    /// The inode behind `fd`: the same file on both ends.
    fn ino(fd: &impl AsFd) -> u64 {
        nix::sys::stat::fstat(fd).unwrap().st_ino
    }

    #[test]
    fn frames_travel_with_their_fds_in_batches() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<OwnedFd> = (0..450).map(|_| memfd("wire")).collect();
        let inodes: Vec<u64> = files.iter().map(ino).collect();
        let sender = std::thread::spawn(move || {
            let fds: Vec<BorrowedFd> = files.iter().map(|f| f.as_fd()).collect();
            send(&a, Kind::Manifest, b"manifest", &fds)?;
            send(&a, Kind::Ready, b"{}", &[])
        });
        let f = recv(&b, &[Kind::Manifest]).unwrap();
        assert_eq!((f.kind, &f.payload[..]), (Kind::Manifest, &b"manifest"[..]));
        assert_eq!(f.fds.iter().map(ino).collect::<Vec<_>>(), inodes);
        let f = recv(&b, &[Kind::HandBack, Kind::Ready]).unwrap();
        assert_eq!((f.kind, &f.payload[..], f.fds.len()), (Kind::Ready, &b"{}"[..], 0));
        sender.join().unwrap().unwrap();
    }

    fn raw(kind: u32, fds: u32, len: u64) -> Vec<u8> {
        let mut b = kind.to_le_bytes().to_vec();
        b.extend(fds.to_le_bytes());
        b.extend(len.to_le_bytes());
        b
    }

    /// What `recv` makes of `bytes` written by a peer that then closed its end.
    fn recv_written(bytes: &[u8], expect: &[Kind]) -> Result<Frame, Error> {
        let (mut a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        a.write_all(bytes).unwrap();
        drop(a);
        recv(&b, expect)
    }

    #[test]
    fn a_truncated_frame_is_refused_saying_where() {
        let mut b = raw(Kind::Hello as u32, 0, 100);
        b.extend([b'x'; 10]);
        let e = recv_written(&b, &[Kind::Hello]).unwrap_err();
        assert!(matches!(e, Error::Closed { .. }), "{e}");
        assert!(e.to_string().contains("after 10 bytes of a hello frame's payload of 100"), "{e}");
        let e = recv_written(&b[..7], &[Kind::Hello]).unwrap_err();
        assert!(e.to_string().contains("frame header"), "{e}");
    }

    #[test]
    fn oversize_frames_are_refused_before_reading_them() {
        let e = recv_written(&raw(Kind::Manifest as u32, 0, MAX_LEN + 1), &[Kind::Manifest]).unwrap_err();
        assert!(matches!(e, Error::TooLarge { kind: Kind::Manifest, .. }), "{e}");
        let e = recv_written(&raw(Kind::Ready as u32, 0, u64::MAX), &[Kind::Ready]).unwrap_err();
        assert!(matches!(e, Error::TooLarge { kind: Kind::Ready, len: u64::MAX, .. }), "{e}");
        // And a sender never sends one.
        let (a, _b) = UnixStream::pair().unwrap();
        let big = vec![0u8; (Kind::Ready.max_len() + 1) as usize];
        assert!(matches!(send(&a, Kind::Ready, &big, &[]), Err(Error::TooLarge { .. })));
    }

    #[test]
    fn too_many_fds_are_refused() {
        let e = recv_written(&raw(Kind::HandBack as u32, MAX_FDS + 1, 2), &[Kind::HandBack]).unwrap_err();
        assert!(matches!(e, Error::TooManyFds { fds, .. } if fds == MAX_FDS + 1), "{e}");
        // A Ready carries none at all.
        let (a, b) = UnixStream::pair().unwrap();
        let f = memfd("wire");
        assert!(matches!(send(&a, Kind::Ready, b"{}", &[f.as_fd()]), Err(Error::TooManyFds { .. })));
        let e = recv_written(&raw(Kind::Ready as u32, 1, 0), &[Kind::Ready]).unwrap_err();
        assert!(matches!(e, Error::TooManyFds { kind: Kind::Ready, .. }), "{e}");
        drop(b);
    }

    #[test]
    fn unknown_and_unexpected_kinds_are_refused() {
        let e = recv_written(&raw(99, 0, 0), &Kind::ALL).unwrap_err();
        assert!(matches!(e, Error::UnknownKind(99)), "{e}");
        let e = recv_written(&raw(Kind::Ready as u32, 0, 0), &[Kind::Hello]).unwrap_err();
        assert_eq!(e.to_string(), "a ready frame where a hello frame was expected");
    }

    #[test]
    fn a_peer_gone_before_its_fds_is_an_error_not_a_hang() {
        // Two fds announced, none passed: the peer's close ends the wait.
        let mut b = raw(Kind::Manifest as u32, 2, 3);
        b.extend(b"abc");
        let t = Instant::now();
        let e = recv_written(&b, &[Kind::Manifest]).unwrap_err();
        assert!(matches!(e, Error::Closed { .. }), "{e}");
        assert!(e.to_string().contains("after 0 of a memory manifest frame's 2 fds"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
        // Fds announced, but the next bytes come without any.
        b.extend(b"zz");
        let e = recv_written(&b, &[Kind::Manifest]).unwrap_err();
        assert!(matches!(e, Error::BadFds { .. }), "{e}");
    }

    #[test]
    fn a_silent_peer_times_out() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut w = &a;
        w.write_all(&raw(Kind::Hello as u32, 0, 10)[..]).unwrap();
        let e = recv(&b, &[Kind::Hello]).unwrap_err();
        assert!(matches!(e, Error::TimedOut), "{e}");
    }

    #[test]
    fn the_fuzz_check_holds_for_hand_made_frames() {
        let mut ok = raw(Kind::Ready as u32, 0, 2);
        ok.extend(b"{}trailing");
        for b in [ok, raw(Kind::Manifest as u32, 1, 0), raw(7, 0, 0), vec![1, 0, 0]] {
            fuzzing::frame(&b);
        }
    }
}
