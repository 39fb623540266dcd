//! CPU collectives over a TCP ring.
//!
//! Every rank keeps two TCP connections: one to its successor `(r + 1) % n` (only written) and one
//! from its predecessor `(r - 1) % n` (only read). All collectives are expressed as one *plan*: the
//! buffer is split into chunks, each chunk into segments of `segment_bytes`; the rank first sends
//! one chunk and then, for each receive step, reads one chunk segment by segment (adding it into
//! place, or copying it), forwarding every finished segment to its successor when the plan says so.
//!
//! Sending and receiving overlap: for large operations a scoped sender thread writes segments
//! while the calling thread receives and reduces (receiving straight into the destination for
//! copies, into a reused scratch segment for sums). Ownership of each segment (`&mut [T]`)
//! travels through channels between the two threads, so the overlap needs no aliasing. Small
//! operations (whose data fits comfortably in the kernel socket buffers) run on the calling
//! thread only, which avoids the thread start-up latency. Optionally
//! ([`TcpRing::set_helper_cpus`]) both halves run on pinned helper threads.
//!
//! Sockets: TCP_NODELAY; on loopback, small (256 KiB) socket buffers, which keep the data in
//! flight in cache; elsewhere kernel autotuning. f32 data is sent as its native bytes, so the
//! handshake rejects peers of the other byte order.
//!
//! Every segment travels in a frame with a 16-byte header (kind, op, op sequence number, length),
//! which catches ranks that call collectives in different orders or with different sizes. A rank
//! whose operation fails sends an *abort* frame (carrying the root cause) to its successor when it
//! can, then closes both connections: neighbours see the abort frame or EOF instead of hanging,
//! and every error names the peer rank it concerns. Every blocking call honours
//! [`RingConfig::timeout`].
//!
//! The rendezvous is authenticated: both ends of every link prove, by a challenge–response with
//! HMAC-SHA256 under the generation's [`RingSecret`] (handed out by the coordinator over the
//! authenticated control plane), that they belong to this job and this generation. A connection
//! that fails the proof is logged with its address and dropped, and accepting goes on, so a
//! stranger that reaches a ring port can neither join nor disturb the ring. Bulk data is not
//! encrypted or authenticated per frame (as with NCCL): the handshake keeps off-path peers out,
//! the cluster network is trusted with the traffic itself.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use super::error::{CollectiveError, Result};

/// Configuration of a ring; must be identical on all ranks (checked in the handshake, except
/// `timeout`).
#[derive(Clone, Debug)]
pub struct RingConfig {
    /// Limit for every blocking read or write, and for the whole rendezvous (connect + accept +
    /// handshake).
    pub timeout: Duration,
    /// Pipelining segment size in bytes.
    pub segment_bytes: usize,
    /// Membership generation; both neighbours must agree.
    pub generation: u64,
    /// The generation's shared secret; the handshake proves both ends hold it.
    pub secret: RingSecret,
}

/// The 32-byte key of a ring's handshake. The coordinator derives one per generation and hands it
/// to that generation's ranks only; [`RingSecret::default`] (all zeros) is for tests and
/// single-process benchmarks, where every rank is this process.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RingSecret([u8; 32]);

impl RingSecret {
    pub const LEN: usize = 32;

    /// From the coordinator's bytes; `None` unless exactly [`RingSecret::LEN`] of them.
    pub fn from_slice(b: &[u8]) -> Option<RingSecret> {
        Some(RingSecret(b.try_into().ok()?))
    }
}

impl std::fmt::Debug for RingSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RingSecret(..)")
    }
}

/// Default pipelining segment (measured on loopback, 2 processes on 2 cores: 1 MiB was best,
/// 512 KiB within a few percent; 256 KiB costs ~30% in syscalls and wake-ups).
pub const DEFAULT_SEGMENT_BYTES: usize = 1024 * 1024;

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            timeout: Duration::from_secs(30),
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            generation: 0,
            secret: RingSecret::default(),
        }
    }
}

/// Bus bandwidth in GB/s (1e9 bytes/s) of an all-reduce of `bytes` bytes over `world` ranks that
/// took `seconds`: `algbw = bytes / seconds`, `busbw = algbw * 2 (n - 1) / n`.
pub fn bus_bandwidth_gbps(bytes: usize, world: usize, seconds: f64) -> f64 {
    if world == 0 || seconds <= 0.0 {
        return 0.0;
    }
    let algbw = bytes as f64 / seconds;
    let n = world as f64;
    algbw * 2.0 * (n - 1.0) / n / 1e9
}

// ---------------------------------------------------------------------------------------------
// Wire format
// ---------------------------------------------------------------------------------------------

const MAGIC: [u8; 8] = *b"BTLRRING";
/// 2: the challenge–response handshake (see [`RingListener::connect`]).
const PROTOCOL_VERSION: u32 = 2;
/// Written in native byte order; a peer reading it back as little-endian learns our byte order.
const ENDIAN_MARKER: u32 = 0x0102_0304;
const HELLO_LEN: usize = 40;
const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;
/// Connector → acceptor: hello ‖ nonce.
const CHALLENGE_LEN: usize = HELLO_LEN + NONCE_LEN;
/// Acceptor → connector: hello ‖ nonce ‖ acceptor's MAC.
const RESPONSE_LEN: usize = HELLO_LEN + NONCE_LEN + MAC_LEN;
/// The MAC labels: each side's proof covers the whole transcript under its own label, so neither
/// proof can be replayed as the other.
const MAC_LABEL_ACCEPTOR: &[u8] = b"butler ring v2: acceptor";
const MAC_LABEL_CONNECTOR: &[u8] = b"butler ring v2: connector";
/// How long one incoming connection may take to finish its part of the handshake: a stranger
/// that connects and stays silent delays the ring by at most this, it cannot stall it.
const HANDSHAKE_STEP_TIMEOUT: Duration = Duration::from_secs(5);

const FRAME_HEADER_LEN: usize = 16;
const FRAME_DATA: u8 = 0xD7;
const FRAME_ABORT: u8 = 0xAB;
const MAX_ABORT_PAYLOAD: usize = 4096;

/// Operations whose buffers are at most this large run on the calling thread only (no thread
/// start-up): the frames one rank sends in such an operation (at most twice this) fit in the
/// kernel's buffering of a connection even before autotuning grows it (sender's 16 KiB-plus
/// SO_SNDBUF + receiver's 64 KiB-plus window), so writing before reading cannot deadlock.
const INLINE_MAX_BYTES: usize = 32 * 1024;
/// After a local failure, how long the sender thread may take to finish its current segment and
/// deliver the abort frame before its connection is shut down under it.
const ABORT_GRACE: Duration = Duration::from_millis(200);
/// After a read timeout, how long to wait for an abort frame that explains it.
const TIMEOUT_GRACE: Duration = Duration::from_millis(150);
/// SO_SNDBUF / SO_RCVBUF requested on loopback connections (Linux doubles it).
const LOOPBACK_SOCKET_BUFFER: usize = 256 * 1024;
const ACCEPT_POLL: Duration = Duration::from_millis(2);
const CONNECT_RETRY: Duration = Duration::from_millis(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    AllReduce = 1,
    AllGather = 2,
    AllGatherBytesSizes = 3,
    AllGatherBytes = 4,
    Broadcast = 5,
    BroadcastBytes = 6,
    Barrier = 7,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce",
            Op::AllGather => "all_gather",
            Op::AllGatherBytesSizes | Op::AllGatherBytes => "all_gather_bytes",
            Op::Broadcast => "broadcast",
            Op::BroadcastBytes => "broadcast_bytes",
            Op::Barrier => "barrier",
        }
    }

    fn from_code(code: u8) -> Option<Op> {
        [
            Op::AllReduce,
            Op::AllGather,
            Op::AllGatherBytesSizes,
            Op::AllGatherBytes,
            Op::Broadcast,
            Op::BroadcastBytes,
            Op::Barrier,
        ]
        .into_iter()
        .find(|op| *op as u8 == code)
    }
}

struct Hello {
    version: u32,
    little_endian: bool,
    generation: u64,
    rank: u64,
    world: u64,
    segment_bytes: u64,
}

fn encode_hello(rank: usize, world: usize, cfg: &RingConfig) -> [u8; HELLO_LEN] {
    let mut b = [0u8; HELLO_LEN];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&ENDIAN_MARKER.to_ne_bytes());
    b[16..24].copy_from_slice(&cfg.generation.to_le_bytes());
    b[24..28].copy_from_slice(&(rank as u32).to_le_bytes());
    b[28..32].copy_from_slice(&(world as u32).to_le_bytes());
    b[32..40].copy_from_slice(&(cfg.segment_bytes as u64).to_le_bytes());
    b
}

/// `None` when the bytes are not a hello at all (stray connection).
fn decode_hello(b: &[u8; HELLO_LEN]) -> Option<Hello> {
    if b[0..8] != MAGIC {
        return None;
    }
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let u64_at = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(w)
    };
    let marker = u32_at(12);
    let little_endian = match marker {
        0x0102_0304 => true,
        0x0403_0201 => false,
        _ => return None,
    };
    Some(Hello {
        version: u32_at(8),
        little_endian,
        generation: u64_at(16),
        rank: u64::from(u32_at(24)),
        world: u64::from(u32_at(28)),
        segment_bytes: u64_at(32),
    })
}

fn check_hello(h: &Hello, expected_rank: usize, world: usize, cfg: &RingConfig) -> Result<()> {
    let fail = |detail: String| {
        Err(CollectiveError::Handshake {
            rank: expected_rank,
            detail,
        })
    };
    let ours_little = cfg!(target_endian = "little");
    if h.version != PROTOCOL_VERSION {
        return fail(format!(
            "protocol version mismatch (ours {PROTOCOL_VERSION}, theirs {})",
            h.version
        ));
    }
    if h.little_endian != ours_little {
        let name = |little: bool| if little { "little" } else { "big" };
        return fail(format!(
            "byte order mismatch (peer is {}-endian, this host is {}-endian)",
            name(h.little_endian),
            name(ours_little)
        ));
    }
    if h.generation != cfg.generation {
        return fail(format!(
            "generation mismatch (expected {}, got {})",
            cfg.generation, h.generation
        ));
    }
    if h.world != world as u64 {
        return fail(format!(
            "world size mismatch (expected {world}, got {})",
            h.world
        ));
    }
    if h.rank != expected_rank as u64 {
        return fail(format!(
            "expected ring neighbour rank {expected_rank}, but the peer says it is rank {}",
            h.rank
        ));
    }
    if h.segment_bytes != cfg.segment_bytes as u64 {
        return fail(format!(
            "segment_bytes mismatch (ours {}, theirs {})",
            cfg.segment_bytes, h.segment_bytes
        ));
    }
    Ok(())
}

fn frame_header(kind: u8, op: Op, seq: u32, len: usize) -> [u8; FRAME_HEADER_LEN] {
    let mut h = [0u8; FRAME_HEADER_LEN];
    h[0] = kind;
    h[1] = op as u8;
    h[4..8].copy_from_slice(&seq.to_le_bytes());
    h[8..16].copy_from_slice(&(len as u64).to_le_bytes());
    h
}

/// `send` flag that turns SIGPIPE into EPIPE for this call.
#[cfg(any(target_os = "linux", target_os = "android"))]
const SEND_FLAGS: std::ffi::c_int = 0x4000; // MSG_NOSIGNAL
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const SEND_FLAGS: std::ffi::c_int = 0;

/// Writes header and payload with as few `sendmsg` calls as possible (one, unless the socket
/// buffer fills up): a separate small header packet would cost the receiver an extra wake-up per
/// segment. MSG_NOSIGNAL makes a closed peer yield EPIPE even where SIGPIPE is not ignored.
fn write_frame(s: &TcpStream, header: &[u8; FRAME_HEADER_LEN], payload: &[u8]) -> io::Result<()> {
    let sock = socket2::SockRef::from(s);
    let mut bufs = [io::IoSlice::new(header), io::IoSlice::new(payload)];
    let mut bufs: &mut [io::IoSlice<'_>] = &mut bufs;
    io::IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match sock.send_vectored_with_flags(bufs, SEND_FLAGS) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------------

/// Element types sent as raw native-endian bytes.
///
/// # Safety
/// Implementors must have no padding and accept every bit pattern.
unsafe trait Pod: Copy + Default + Send + Sync + 'static {}
// SAFETY: f32 and u8 have no padding and every bit pattern is a valid value.
unsafe impl Pod for f32 {}
// SAFETY: see above.
unsafe impl Pod for u8 {}

fn as_bytes<T: Pod>(s: &[T]) -> &[u8] {
    // SAFETY: T is Pod (initialized, no padding); u8 has alignment 1; the length is the exact
    // byte size of the slice, and the borrow keeps the memory alive.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

fn as_bytes_mut<T: Pod>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: as above; additionally every bit pattern written through the byte view is a valid
    // T, and the exclusive borrow is carried over.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

fn add_assign_f32(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += *s;
    }
}

// ---------------------------------------------------------------------------------------------
// Rendezvous
// ---------------------------------------------------------------------------------------------

/// Bound but not yet connected; its address is published to peers.
pub struct RingListener {
    listener: TcpListener,
    local: SocketAddr,
}

impl RingListener {
    /// Binds a listener (port 0 allowed).
    pub fn bind(addr: SocketAddr) -> Result<RingListener> {
        let listener =
            TcpListener::bind(addr).map_err(|source| CollectiveError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| CollectiveError::Bind { addr, source })?;
        Ok(RingListener { listener, local })
    }

    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// `peers[i]` is rank i's listener address (`peers.len()` is the world size). Connects to
    /// rank `(rank + 1) % n`, accepts from rank `(rank - 1) % n` and handshakes, all within
    /// `cfg.timeout`. World size 1 needs no sockets.
    ///
    /// The handshake on each link: the connector sends its hello (magic, protocol version, byte
    /// order, generation, rank, world size, segment size) and a random nonce; the acceptor answers
    /// with its own hello, nonce and `HMAC(secret, "acceptor" ‖ transcript)`; the connector checks
    /// the hello and the MAC and answers `HMAC(secret, "connector" ‖ transcript)`; the acceptor
    /// checks that before it trusts the connection. A fresh nonce on both sides makes every
    /// transcript new, so a recorded handshake (of this generation or an earlier one, whose secret
    /// differs) proves nothing. The acceptor refuses a failed proof and goes on accepting; the
    /// connector, which chose its peer from the coordinator's list, fails with an error naming it.
    pub fn connect(self, rank: usize, peers: &[SocketAddr], cfg: RingConfig) -> Result<TcpRing> {
        let world = peers.len();
        let invalid = |detail: String| {
            Err(CollectiveError::InvalidArgument {
                op: "rendezvous",
                detail,
            })
        };
        if world == 0 {
            return invalid("empty peer list".into());
        }
        if world > u32::MAX as usize {
            return invalid(format!("world size {world} too large"));
        }
        if rank >= world {
            return invalid(format!("rank {rank} out of range for world size {world}"));
        }
        if cfg.timeout.is_zero() {
            return invalid("timeout must be positive".into());
        }
        if cfg.segment_bytes == 0 {
            return invalid("segment_bytes must be positive".into());
        }
        if world == 1 {
            return Ok(TcpRing::new(rank, world, cfg, LinkState::Single));
        }

        let deadline = Instant::now() + cfg.timeout;
        let next = (rank + 1) % world;
        let prev = (rank + world - 1) % world;
        let hello = encode_hello(rank, world, &cfg);
        let handshake =
            |peer: usize| move |detail: String| CollectiveError::Handshake { rank: peer, detail };

        // Four phases, each of which only waits for what a neighbour sent in an earlier phase, so
        // the ring cannot deadlock however the ranks interleave: (1) challenge the successor;
        // (2) answer the predecessor's challenge; (3) check the successor's answer and prove
        // ourselves to it; (4) check the predecessor's proof.
        let nonce: [u8; NONCE_LEN] = rand::random();
        let mut challenge = [0u8; CHALLENGE_LEN];
        challenge[..HELLO_LEN].copy_from_slice(&hello);
        challenge[HELLO_LEN..].copy_from_slice(&nonce);
        let to_next = connect_with_retry(peers[next], next, deadline)?;
        configure_stream(&to_next, next)?;
        set_timeouts(&to_next, remaining(deadline), next)?;
        (&to_next)
            .write_all(&challenge)
            .map_err(|e| handshake(next)(format!("sending the challenge: {e}")))?;

        let mut candidate = self.accept_candidate(prev, &cfg, &hello, deadline)?;

        set_timeouts(&to_next, remaining(deadline), next)?;
        let mut response = [0u8; RESPONSE_LEN];
        (&to_next).read_exact(&mut response).map_err(|e| {
            handshake(next)(match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    format!("no reply within {:?}", cfg.timeout)
                }
                io::ErrorKind::UnexpectedEof => "peer closed the connection".into(),
                _ => format!("reading reply: {e}"),
            })
        })?;
        let reply_hello: &[u8; HELLO_LEN] = response[..HELLO_LEN].try_into().expect("length");
        let reply = decode_hello(reply_hello)
            .ok_or_else(|| handshake(next)("reply is not a ring hello (bad magic)".into()))?;
        check_hello(&reply, next, world, &cfg)?;
        let transcript = Transcript {
            challenge,
            response_head: response[..HELLO_LEN + NONCE_LEN]
                .try_into()
                .expect("length"),
        };
        if !transcript.verify(
            &cfg.secret,
            MAC_LABEL_ACCEPTOR,
            &response[HELLO_LEN + NONCE_LEN..],
        ) {
            return Err(handshake(next)(format!(
                "the peer at {} failed authentication: it does not hold this job's ring secret \
                 for generation {}",
                peers[next], cfg.generation
            )));
        }
        (&to_next)
            .write_all(&transcript.mac(&cfg.secret, MAC_LABEL_CONNECTOR))
            .map_err(|e| handshake(next)(format!("sending the proof: {e}")))?;

        let from_prev = loop {
            match candidate.finish(&cfg.secret, deadline) {
                Ok(h) => {
                    check_hello(&h, prev, world, &cfg)?;
                    break candidate.stream;
                }
                Err(why) => {
                    tracing::warn!(
                        peer = %candidate.from,
                        expected_rank = prev,
                        generation = cfg.generation,
                        "ring: refused a connection that failed authentication: {why}"
                    );
                    drop(candidate);
                    candidate = self.accept_candidate(prev, &cfg, &hello, deadline)?;
                }
            }
        };

        set_timeouts(&to_next, cfg.timeout, next)?;
        set_timeouts(&from_prev, cfg.timeout, prev)?;
        tracing::debug!(
            rank,
            world,
            next,
            prev,
            generation = cfg.generation,
            "ring connected"
        );
        Ok(TcpRing::new(
            rank,
            world,
            cfg,
            LinkState::Connected(Links { to_next, from_prev }),
        ))
    }

    /// Accepts connections until one sends a ring challenge, and answers it (our hello, a fresh
    /// nonce and our proof). Connections that do not start with a ring hello are dropped. Nothing
    /// is trusted yet: [`Candidate::finish`] checks the peer's proof.
    fn accept_candidate(
        &self,
        prev: usize,
        cfg: &RingConfig,
        hello: &[u8; HELLO_LEN],
        deadline: Instant,
    ) -> Result<Candidate> {
        let setup = |context: &'static str| {
            move |source: io::Error| CollectiveError::Setup {
                rank: prev,
                context,
                source,
            }
        };
        self.listener
            .set_nonblocking(true)
            .map_err(setup("making the listener non-blocking"))?;
        loop {
            match self.listener.accept() {
                Ok((stream, from)) => {
                    stream
                        .set_nonblocking(false)
                        .map_err(setup("making the accepted socket blocking"))?;
                    configure_stream(&stream, prev)?;
                    set_timeouts(
                        &stream,
                        remaining(deadline).min(HANDSHAKE_STEP_TIMEOUT),
                        prev,
                    )?;
                    let mut challenge = [0u8; CHALLENGE_LEN];
                    let got = (&stream).read_exact(&mut challenge);
                    let hello_c: &[u8; HELLO_LEN] =
                        challenge[..HELLO_LEN].try_into().expect("length");
                    if got.is_ok() && decode_hello(hello_c).is_some() {
                        let nonce: [u8; NONCE_LEN] = rand::random();
                        let mut head = [0u8; HELLO_LEN + NONCE_LEN];
                        head[..HELLO_LEN].copy_from_slice(hello);
                        head[HELLO_LEN..].copy_from_slice(&nonce);
                        let transcript = Transcript {
                            challenge,
                            response_head: head,
                        };
                        let mut response = [0u8; RESPONSE_LEN];
                        response[..HELLO_LEN + NONCE_LEN].copy_from_slice(&head);
                        response[HELLO_LEN + NONCE_LEN..]
                            .copy_from_slice(&transcript.mac(&cfg.secret, MAC_LABEL_ACCEPTOR));
                        // Answer before judging, so that a peer whose configuration differs can
                        // report the mismatch too.
                        if (&stream).write_all(&response).is_ok() {
                            return Ok(Candidate {
                                stream,
                                from,
                                transcript,
                            });
                        }
                    }
                    tracing::debug!(%from, "ring: ignoring a connection without a ring hello");
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => return Err(setup("accepting")(e)),
            }
            let left = remaining(deadline);
            if left.is_zero() {
                return Err(CollectiveError::AcceptTimeout {
                    rank: prev,
                    timeout: cfg.timeout,
                    local: self.local,
                });
            }
            std::thread::sleep(ACCEPT_POLL.min(left));
        }
    }
}

/// What both ends of a link MAC: the connector's challenge and the head of the acceptor's response.
struct Transcript {
    challenge: [u8; CHALLENGE_LEN],
    response_head: [u8; HELLO_LEN + NONCE_LEN],
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

impl Transcript {
    fn hmac(&self, secret: &RingSecret, label: &[u8]) -> HmacSha256 {
        use hmac::Mac;
        let mut m = HmacSha256::new_from_slice(&secret.0).expect("HMAC takes any key length");
        m.update(label);
        m.update(&self.challenge);
        m.update(&self.response_head);
        m
    }

    fn mac(&self, secret: &RingSecret, label: &[u8]) -> [u8; MAC_LEN] {
        use hmac::Mac;
        self.hmac(secret, label).finalize().into_bytes().into()
    }

    /// Constant-time comparison of a received MAC.
    fn verify(&self, secret: &RingSecret, label: &[u8], got: &[u8]) -> bool {
        use hmac::Mac;
        self.hmac(secret, label).verify_slice(got).is_ok()
    }
}

/// An accepted connection that has sent a ring challenge and got our answer, not yet proven.
struct Candidate {
    stream: TcpStream,
    from: SocketAddr,
    transcript: Transcript,
}

impl Candidate {
    /// Reads the peer's proof and checks it; on success, the peer's (authenticated) hello.
    fn finish(&self, secret: &RingSecret, deadline: Instant) -> std::result::Result<Hello, String> {
        let t = remaining(deadline).min(HANDSHAKE_STEP_TIMEOUT);
        let _ = self
            .stream
            .set_read_timeout(Some(t.max(Duration::from_millis(1))));
        let mut proof = [0u8; MAC_LEN];
        (&self.stream)
            .read_exact(&mut proof)
            .map_err(|e| format!("no proof of the ring secret ({e})"))?;
        if !self.transcript.verify(secret, MAC_LABEL_CONNECTOR, &proof) {
            return Err("wrong proof: the peer does not hold this generation's ring secret".into());
        }
        let hello: &[u8; HELLO_LEN] = self.transcript.challenge[..HELLO_LEN]
            .try_into()
            .expect("length");
        decode_hello(hello).ok_or_else(|| "not a ring hello".to_string())
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

fn connect_with_retry(addr: SocketAddr, rank: usize, deadline: Instant) -> Result<TcpStream> {
    let mut last_err = None;
    loop {
        let left = remaining(deadline);
        if left.is_zero() {
            return Err(CollectiveError::Connect {
                rank,
                addr,
                source: last_err.unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::TimedOut, "timed out before connecting")
                }),
            });
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => return Ok(s),
            // The peer may not be listening yet: retry until the deadline.
            Err(e) => last_err = Some(e),
        }
        std::thread::sleep(CONNECT_RETRY.min(remaining(deadline)));
    }
}

fn configure_stream(s: &TcpStream, rank: usize) -> Result<()> {
    let setup = |context: &'static str| {
        move |source: io::Error| CollectiveError::Setup {
            rank,
            context,
            source,
        }
    };
    s.set_nodelay(true).map_err(setup("setting TCP_NODELAY"))?;
    let peer = s.peer_addr().map_err(setup("reading the peer address"))?;
    if peer.ip().is_loopback() {
        // No bandwidth-delay product to cover on loopback: small buffers keep the data in flight
        // in cache between the sender's copy-in and the receiver's copy-out (measured: ~1.5x
        // faster than autotuned multi-MiB buffers). Over a real network the kernel's autotuning
        // is left alone.
        let sock = socket2::SockRef::from(s);
        sock.set_send_buffer_size(LOOPBACK_SOCKET_BUFFER)
            .map_err(setup("setting SO_SNDBUF"))?;
        sock.set_recv_buffer_size(LOOPBACK_SOCKET_BUFFER)
            .map_err(setup("setting SO_RCVBUF"))?;
    }
    Ok(())
}

fn set_timeouts(s: &TcpStream, t: Duration, rank: usize) -> Result<()> {
    // A zero timeout means "block forever" to the OS: use a tiny one instead.
    let t = Some(t.max(Duration::from_millis(1)));
    s.set_read_timeout(t)
        .and_then(|()| s.set_write_timeout(t))
        .map_err(|source| CollectiveError::Setup {
            rank,
            context: "setting socket timeouts",
            source,
        })
}

// ---------------------------------------------------------------------------------------------
// The ring
// ---------------------------------------------------------------------------------------------

struct Links {
    /// Written only: frames to the successor.
    to_next: TcpStream,
    /// Read only: frames from the predecessor.
    from_prev: TcpStream,
}

enum LinkState {
    Single,
    Connected(Links),
    /// An operation failed; the connections are closed. Holds the failure message.
    Broken(String),
}

/// A connected ring. `Send`, not `Sync`: use it from one thread at a time.
pub struct TcpRing {
    rank: usize,
    world: usize,
    cfg: RingConfig,
    state: LinkState,
    seq: u32,
    scratch: Vec<f32>,
    cpus: HelperCpus,
}

const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<TcpRing>();
};

struct Ctx {
    op: Op,
    seq: u32,
    rank: usize,
    next: usize,
    prev: usize,
    timeout: Duration,
    segment_bytes: usize,
    cpus: HelperCpus,
}

/// Optional CPU pinning of the helper threads of large operations.
#[derive(Clone, Copy, Debug, Default)]
struct HelperCpus {
    send: Option<usize>,
    recv: Option<usize>,
}

/// Largest CPU index that [`TcpRing::set_helper_cpus`] accepts (glibc's `cpu_set_t` size).
const MAX_CPUS: usize = 1024;

/// Restricts the calling thread to one CPU. Best effort: failures are logged and ignored.
#[cfg(target_os = "linux")]
fn pin_current_thread(cpu: usize) {
    unsafe extern "C" {
        fn sched_setaffinity(pid: i32, cpusetsize: usize, mask: *const u64) -> i32;
    }
    let mut mask = [0u64; MAX_CPUS / 64];
    mask[cpu / 64] |= 1 << (cpu % 64);
    // SAFETY: `mask` is a properly sized and aligned CPU bitmask that outlives the call; pid 0
    // designates the calling thread. The call only changes this thread's scheduling.
    let rc = unsafe { sched_setaffinity(0, std::mem::size_of_val(&mask), mask.as_ptr()) };
    if rc != 0 {
        tracing::debug!(
            cpu,
            "ring: could not pin helper thread: {}",
            io::Error::last_os_error()
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn pin_current_thread(_cpu: usize) {}

impl Ctx {
    fn io_error(&self, peer: usize, e: io::Error, sending: bool) -> CollectiveError {
        let op = self.op.name();
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => CollectiveError::Timeout {
                op,
                rank: peer,
                timeout: self.timeout,
                what: if sending {
                    "it is not accepting data"
                } else {
                    "no data received"
                },
            },
            io::ErrorKind::UnexpectedEof => CollectiveError::PeerClosed {
                op,
                rank: peer,
                how: "",
            },
            io::ErrorKind::ConnectionReset => CollectiveError::PeerClosed {
                op,
                rank: peer,
                how: " (connection reset)",
            },
            io::ErrorKind::ConnectionAborted => CollectiveError::PeerClosed {
                op,
                rank: peer,
                how: " (connection aborted)",
            },
            io::ErrorKind::BrokenPipe | io::ErrorKind::NotConnected => {
                CollectiveError::PeerClosed {
                    op,
                    rank: peer,
                    how: " (broken pipe)",
                }
            }
            _ => CollectiveError::PeerIo {
                op,
                rank: peer,
                source: e,
            },
        }
    }

    fn protocol(&self, detail: String) -> CollectiveError {
        CollectiveError::Protocol {
            op: self.op.name(),
            rank: self.prev,
            detail,
        }
    }

    fn internal(&self, detail: &str) -> CollectiveError {
        CollectiveError::Internal {
            op: self.op.name(),
            detail: detail.to_string(),
        }
    }

    fn data_header(&self, len: usize) -> [u8; FRAME_HEADER_LEN] {
        frame_header(FRAME_DATA, self.op, self.seq, len)
    }

    /// Abort frame payload: the rank where the failure started and its message.
    fn abort_payload(&self, err: &CollectiveError) -> Vec<u8> {
        let (origin, cause) = match err {
            CollectiveError::PeerAborted { origin, cause, .. } => (*origin, cause.clone()),
            other => (self.rank, other.to_string()),
        };
        let mut cut = cause.len().min(MAX_ABORT_PAYLOAD - 4);
        while !cause.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut p = Vec::with_capacity(4 + cut);
        p.extend_from_slice(&(origin as u32).to_le_bytes());
        p.extend_from_slice(&cause.as_bytes()[..cut]);
        p
    }

    fn write_abort(&self, s: &TcpStream, payload: &[u8]) {
        let header = frame_header(FRAME_ABORT, self.op, self.seq, payload.len());
        if let Err(e) = write_frame(s, &header, payload) {
            tracing::debug!(
                op = self.op.name(),
                next = self.next,
                "could not send abort frame: {e}"
            );
        }
    }

    /// Reads and validates the next frame header from the predecessor, expecting a data frame of
    /// `len` bytes. An abort frame turns into [`CollectiveError::PeerAborted`].
    fn read_header(&self, s: &TcpStream, len: usize) -> Result<()> {
        let mut h = [0u8; FRAME_HEADER_LEN];
        (&*s)
            .read_exact(&mut h)
            .map_err(|e| self.io_error(self.prev, e, false))?;
        self.check_header(s, &h, len)
    }

    /// After timing out while waiting for a frame header: the predecessor may be timing out on
    /// its own predecessor at the same moment. Give its abort frame (which names the real
    /// culprit) a short while to arrive.
    fn late_abort(&self, s: &TcpStream) -> Option<CollectiveError> {
        s.set_read_timeout(Some(TIMEOUT_GRACE)).ok()?;
        let mut h = [0u8; FRAME_HEADER_LEN];
        (&*s).read_exact(&mut h).ok()?;
        if h[0] != FRAME_ABORT {
            return None;
        }
        self.check_header(s, &h, 0).err()
    }

    fn check_header(&self, s: &TcpStream, h: &[u8; FRAME_HEADER_LEN], len: usize) -> Result<()> {
        let seq = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let mut l = [0u8; 8];
        l.copy_from_slice(&h[8..16]);
        let got_len = u64::from_le_bytes(l);
        match h[0] {
            FRAME_DATA => {}
            FRAME_ABORT => {
                if got_len < 4 || got_len > MAX_ABORT_PAYLOAD as u64 {
                    return Err(self.protocol(format!("abort frame with bad length {got_len}")));
                }
                let mut p = vec![0u8; got_len as usize];
                (&*s)
                    .read_exact(&mut p)
                    .map_err(|e| self.io_error(self.prev, e, false))?;
                let origin = u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize;
                return Err(CollectiveError::PeerAborted {
                    op: self.op.name(),
                    rank: self.prev,
                    origin,
                    cause: String::from_utf8_lossy(&p[4..]).into_owned(),
                });
            }
            k => return Err(self.protocol(format!("unknown frame kind {k:#04x}"))),
        }
        if h[1] != self.op as u8 {
            let theirs = Op::from_code(h[1]).map_or("an unknown operation", Op::name);
            return Err(self.protocol(format!(
                "peer is running {theirs} while this rank runs {} (collectives called in different orders)",
                self.op.name()
            )));
        }
        if seq != self.seq {
            return Err(self.protocol(format!(
                "operation sequence mismatch (expected #{}, got #{seq}): ranks issued different numbers of collectives",
                self.seq
            )));
        }
        if got_len != len as u64 {
            return Err(self.protocol(format!(
                "segment of {got_len} bytes where {len} were expected (buffer sizes differ across ranks?)"
            )));
        }
        Ok(())
    }
}

/// One receive step of a plan.
struct RecvStep {
    /// Chunk to receive.
    chunk: usize,
    /// Add into place (true) or overwrite (false).
    reduce: bool,
    /// Forward the finished chunk to the successor.
    forward: bool,
}

struct Plan {
    /// Chunk sent before any receive.
    first_send: Option<usize>,
    recvs: Vec<RecvStep>,
}

impl Plan {
    /// Ring all-gather: send own chunk `rank`, then receive (and forward all but the last)
    /// chunks `rank-1, rank-2, ...`.
    fn all_gather(rank: usize, world: usize) -> Plan {
        Plan {
            first_send: Some(rank),
            recvs: (0..world - 1)
                .map(|s| RecvStep {
                    chunk: (rank + world - 1 - s) % world,
                    reduce: false,
                    forward: s + 2 < world,
                })
                .collect(),
        }
    }

    /// Ring all-reduce: reduce-scatter (`n - 1` reducing steps, after which this rank owns the
    /// fully reduced chunk `rank + 1`), then all-gather of the reduced chunks.
    fn all_reduce(rank: usize, world: usize) -> Plan {
        let reduce_scatter = (0..world - 1).map(|s| RecvStep {
            chunk: (rank + world - 1 - s) % world,
            reduce: true,
            forward: true,
        });
        let all_gather = (0..world - 1).map(|s| RecvStep {
            chunk: (rank + world - s) % world,
            reduce: false,
            forward: s + 2 < world,
        });
        Plan {
            first_send: Some(rank),
            recvs: reduce_scatter.chain(all_gather).collect(),
        }
    }

    /// Pipelined chain `root -> root+1 -> ... -> root-1` over a single chunk.
    fn broadcast(rank: usize, world: usize, root: usize) -> Plan {
        if rank == root {
            Plan {
                first_send: Some(0),
                recvs: Vec::new(),
            }
        } else {
            Plan {
                first_send: None,
                recvs: vec![RecvStep {
                    chunk: 0,
                    reduce: false,
                    forward: (rank + 1) % world != root,
                }],
            }
        }
    }
}

/// Splits `buf` into consecutive slices of the given sizes (which must add up to at most its
/// length).
fn split_sizes<T>(mut buf: &mut [T], sizes: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
    let mut out = Vec::new();
    for size in sizes {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(size);
        out.push(head);
        buf = tail;
    }
    out
}

/// Sizes of `world` nearly equal chunks covering `len` elements.
fn even_sizes(len: usize, world: usize) -> impl Iterator<Item = usize> {
    let (base, rem) = (len / world, len % world);
    (0..world).map(move |i| base + usize::from(i < rem))
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    /// Receiving from the predecessor (or a protocol violation by it).
    Recv,
    /// Sending to the successor.
    Send,
    /// A local problem.
    Local,
    /// Consequence of the sender thread's failure, which is reported instead.
    Secondary,
}

struct Fail {
    side: Side,
    err: CollectiveError,
    /// Timed out waiting for a frame header (the stream is still at a frame boundary).
    header_timeout: bool,
}

impl Fail {
    fn new(side: Side, err: CollectiveError) -> Fail {
        Fail {
            side,
            err,
            header_timeout: false,
        }
    }

    fn recv(err: CollectiveError) -> Fail {
        Fail::new(Side::Recv, err)
    }

    /// Reports the failure to the successor (`send_abort`), then, after a header timeout,
    /// prefers an abort frame from the predecessor that arrives shortly afterwards.
    fn finish(
        self,
        ctx: &Ctx,
        from_prev: &TcpStream,
        send_abort: impl FnOnce(Vec<u8>),
    ) -> CollectiveError {
        if self.side == Side::Send || self.side == Side::Secondary {
            return self.err;
        }
        send_abort(ctx.abort_payload(&self.err));
        let late = if self.header_timeout {
            ctx.late_abort(from_prev)
        } else {
            None
        };
        late.unwrap_or(self.err)
    }
}

type SegSlot<'a, T> = Option<&'a mut [T]>;

/// Where finished segments go: written directly (inline) or handed to the sender thread.
trait Outbox<'a, T: Pod> {
    /// Sends segment `idx`; returns it if it was sent synchronously.
    fn handover(
        &mut self,
        idx: usize,
        seg: &'a mut [T],
    ) -> std::result::Result<SegSlot<'a, T>, Fail>;
    /// Makes sure segment `idx` is back in `segs` (the sender is done with it).
    fn acquire(&mut self, segs: &mut [SegSlot<'a, T>], idx: usize)
        -> std::result::Result<(), Fail>;
}

struct InlineOutbox<'c> {
    ctx: &'c Ctx,
    stream: &'c TcpStream,
}

impl<'a, T: Pod> Outbox<'a, T> for InlineOutbox<'_> {
    fn handover(
        &mut self,
        _idx: usize,
        seg: &'a mut [T],
    ) -> std::result::Result<SegSlot<'a, T>, Fail> {
        let bytes = as_bytes(seg);
        write_frame(self.stream, &self.ctx.data_header(bytes.len()), bytes)
            .map_err(|e| Fail::new(Side::Send, self.ctx.io_error(self.ctx.next, e, true)))?;
        Ok(Some(seg))
    }

    fn acquire(
        &mut self,
        segs: &mut [SegSlot<'a, T>],
        idx: usize,
    ) -> std::result::Result<(), Fail> {
        if segs[idx].is_some() {
            Ok(())
        } else {
            Err(Fail::new(
                Side::Local,
                self.ctx.internal("segment missing in inline mode"),
            ))
        }
    }
}

enum Item<'a, T> {
    Data(usize, &'a mut [T]),
    Abort(Vec<u8>),
}

struct ThreadOutbox<'a, T> {
    ctx_op: &'static str,
    tx: Option<mpsc::Sender<Item<'a, T>>>,
    rx: mpsc::Receiver<(usize, &'a mut [T])>,
}

impl<T> ThreadOutbox<'_, T> {
    fn sender_gone(&self) -> Fail {
        Fail::new(
            Side::Secondary,
            CollectiveError::Internal {
                op: self.ctx_op,
                detail: "sender thread stopped".into(),
            },
        )
    }
}

impl<'a, T: Pod> Outbox<'a, T> for ThreadOutbox<'a, T> {
    fn handover(
        &mut self,
        idx: usize,
        seg: &'a mut [T],
    ) -> std::result::Result<SegSlot<'a, T>, Fail> {
        match &self.tx {
            Some(tx) if tx.send(Item::Data(idx, seg)).is_ok() => Ok(None),
            _ => Err(self.sender_gone()),
        }
    }

    fn acquire(
        &mut self,
        segs: &mut [SegSlot<'a, T>],
        idx: usize,
    ) -> std::result::Result<(), Fail> {
        while segs[idx].is_none() {
            match self.rx.recv() {
                Ok((i, seg)) => segs[i] = Some(seg),
                Err(_) => return Err(self.sender_gone()),
            }
        }
        Ok(())
    }
}

struct Reduce<'s, T> {
    scratch: &'s mut Vec<T>,
    f: fn(&mut [T], &[T]),
}

/// The receiving side of one operation, run on the calling thread.
struct MainLoop<'a, 'c, T> {
    ctx: &'c Ctx,
    stream: &'c TcpStream,
    segs: Vec<SegSlot<'a, T>>,
    seg_lens: Vec<usize>,
    chunk_segs: Vec<Range<usize>>,
    reduce: Option<Reduce<'c, T>>,
}

impl<'a, 'c, T: Pod> MainLoop<'a, 'c, T> {
    fn run(&mut self, plan: &Plan, out: &mut impl Outbox<'a, T>) -> std::result::Result<(), Fail> {
        if let Some(c) = plan.first_send {
            for i in self.chunk_segs[c].clone() {
                let seg = self.take(i)?;
                if let Some(back) = out.handover(i, seg)? {
                    self.segs[i] = Some(back);
                }
            }
        }
        for step in &plan.recvs {
            for i in self.chunk_segs[step.chunk].clone() {
                let seg = if step.reduce {
                    // Receive into scratch first, then claim the segment: a plan may still be
                    // sending it, and the predecessor's data must not wait for our sender.
                    let len = self.seg_lens[i];
                    self.recv_scratch(len)?;
                    out.acquire(&mut self.segs, i)?;
                    let seg = self.take(i)?;
                    self.reduce_into(seg)?;
                    seg
                } else {
                    out.acquire(&mut self.segs, i)?;
                    let seg = self.take(i)?;
                    self.read_frame(seg)?;
                    seg
                };
                if step.forward {
                    if let Some(back) = out.handover(i, seg)? {
                        self.segs[i] = Some(back);
                    }
                } else {
                    self.segs[i] = Some(seg);
                }
            }
        }
        Ok(())
    }

    fn take(&mut self, i: usize) -> std::result::Result<&'a mut [T], Fail> {
        self.segs[i].take().ok_or_else(|| {
            Fail::new(
                Side::Local,
                self.ctx
                    .internal("segment not owned by the receiving thread"),
            )
        })
    }

    /// Reads the next frame (expected to carry `buf.len()` elements) into `buf`.
    fn read_frame(&self, buf: &mut [T]) -> std::result::Result<(), Fail> {
        let ctx = self.ctx;
        ctx.read_header(self.stream, std::mem::size_of_val(buf))
            .map_err(|err| Fail {
                header_timeout: matches!(err, CollectiveError::Timeout { .. }),
                ..Fail::recv(err)
            })?;
        (&*self.stream)
            .read_exact(as_bytes_mut(buf))
            .map_err(|e| Fail::recv(ctx.io_error(ctx.prev, e, false)))
    }

    fn reducer(&mut self) -> std::result::Result<&mut Reduce<'c, T>, Fail> {
        let ctx = self.ctx;
        self.reduce.as_mut().ok_or_else(|| {
            Fail::new(
                Side::Local,
                ctx.internal("reducing step without a reduction"),
            )
        })
    }

    /// Reads the next frame of `len` elements into the scratch segment.
    fn recv_scratch(&mut self, len: usize) -> std::result::Result<(), Fail> {
        let mut scratch = std::mem::take(self.reducer()?.scratch);
        let res = self.read_frame(&mut scratch[..len]);
        *self.reducer()?.scratch = scratch;
        res
    }

    /// Adds the scratch segment into `seg`.
    fn reduce_into(&mut self, seg: &mut [T]) -> std::result::Result<(), Fail> {
        let red = self.reducer()?;
        (red.f)(seg, &red.scratch[..seg.len()]);
        Ok(())
    }
}

const NOBODY: u8 = 0;
const MAIN: u8 = 1;
const SENDER: u8 = 2;

fn sender_loop<'a, T: Pod>(
    ctx: &Ctx,
    links: &Links,
    ready: mpsc::Receiver<Item<'a, T>>,
    done: mpsc::Sender<(usize, &'a mut [T])>,
    first: &AtomicU8,
) -> Result<()> {
    if let Some(cpu) = ctx.cpus.send {
        pin_current_thread(cpu);
    }
    for item in ready {
        match item {
            Item::Data(idx, seg) => {
                let bytes = as_bytes(seg);
                if let Err(e) = write_frame(&links.to_next, &ctx.data_header(bytes.len()), bytes) {
                    let err = ctx.io_error(ctx.next, e, true);
                    if first
                        .compare_exchange(NOBODY, SENDER, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                    {
                        // Wake the receiving thread if it is blocked on the predecessor.
                        let _ = links.from_prev.shutdown(Shutdown::Read);
                    }
                    return Err(err);
                }
                // The receiving thread may already have stopped; then nobody needs the segment.
                let _ = done.send((idx, seg));
            }
            Item::Abort(payload) => {
                ctx.write_abort(&links.to_next, &payload);
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Runs one plan over `chunks` (index = chunk id).
fn execute<'a, T: Pod>(
    ctx: &Ctx,
    links: &Links,
    chunks: Vec<&'a mut [T]>,
    plan: &Plan,
    mut reduce: Option<Reduce<'_, T>>,
) -> Result<()> {
    let seg_elems = (ctx.segment_bytes / std::mem::size_of::<T>()).max(1);
    let mut segs = Vec::new();
    let mut chunk_segs = Vec::with_capacity(chunks.len());
    let mut total_bytes = 0usize;
    let mut largest_seg = 0usize;
    for chunk in chunks {
        total_bytes += std::mem::size_of_val(chunk);
        largest_seg = largest_seg.max(chunk.len().min(seg_elems));
        let start = segs.len();
        segs.extend(chunk.chunks_mut(seg_elems).map(Some));
        chunk_segs.push(start..segs.len());
    }
    if let Some(red) = reduce.as_mut().filter(|r| r.scratch.len() < largest_seg) {
        red.scratch.resize(largest_seg, T::default());
    }
    let seg_lens = segs
        .iter()
        .map(|s| s.as_ref().map_or(0, |s| s.len()))
        .collect();
    let mut main = MainLoop {
        ctx,
        stream: &links.from_prev,
        segs,
        seg_lens,
        chunk_segs,
        reduce,
    };

    if total_bytes <= INLINE_MAX_BYTES {
        let mut out = InlineOutbox {
            ctx,
            stream: &links.to_next,
        };
        return main.run(plan, &mut out).map_err(|f| {
            f.finish(ctx, &links.from_prev, |payload| {
                ctx.write_abort(&links.to_next, &payload);
            })
        });
    }

    let first = AtomicU8::new(NOBODY);
    let (ready_tx, ready_rx) = mpsc::channel::<Item<'a, T>>();
    let (done_tx, done_rx) = mpsc::channel::<(usize, &'a mut [T])>();
    std::thread::scope(|scope| {
        let first = &first;
        let sender = std::thread::Builder::new()
            .name("ring-sender".into())
            .spawn_scoped(scope, move || {
                sender_loop(ctx, links, ready_rx, done_tx, first)
            })
            .map_err(|e| ctx.internal(&format!("could not start the sender thread: {e}")))?;
        // The receiving half: on the calling thread, or on a pinned helper thread.
        let receive = move || -> Result<()> {
            if let Some(cpu) = ctx.cpus.recv {
                pin_current_thread(cpu);
            }
            let mut out = ThreadOutbox {
                ctx_op: ctx.op.name(),
                tx: Some(ready_tx),
                rx: done_rx,
            };
            main.run(plan, &mut out).map_err(|f| {
                let primary = f.side != Side::Secondary
                    && first
                        .compare_exchange(NOBODY, MAIN, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok();
                if !primary {
                    return f.err;
                }
                let tx = out.tx.take();
                let err = f.finish(ctx, &links.from_prev, |payload| {
                    if let Some(tx) = &tx {
                        let _ = tx.send(Item::Abort(payload));
                    }
                });
                drop(tx);
                // Give the sender a moment to finish its segment and deliver the abort frame, then
                // force it out of a write that the successor is not draining.
                let deadline = Instant::now() + ABORT_GRACE.min(ctx.timeout);
                loop {
                    match out.rx.recv_timeout(remaining(deadline)) {
                        Ok(_) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            let _ = links.to_next.shutdown(Shutdown::Write);
                            break;
                        }
                    }
                }
                err
            })
        };
        let main_res = if ctx.cpus.recv.is_some() {
            std::thread::Builder::new()
                .name("ring-receiver".into())
                .spawn_scoped(scope, receive)
                .map_err(|e| ctx.internal(&format!("could not start the receiver thread: {e}")))
                .and_then(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(ctx.internal("the receiver thread panicked")))
                })
        } else {
            receive()
        };
        let send_res = sender
            .join()
            .unwrap_or_else(|_| Err(ctx.internal("the sender thread panicked")));
        match (main_res, send_res) {
            (Ok(()), Ok(())) => Ok(()),
            (Ok(()), Err(s)) => Err(s),
            (Err(m), Ok(())) => Err(m),
            (Err(m), Err(s)) => {
                if first.load(Ordering::Acquire) == SENDER {
                    Err(s)
                } else {
                    Err(m)
                }
            }
        }
    })
}

impl TcpRing {
    fn new(rank: usize, world: usize, cfg: RingConfig, state: LinkState) -> TcpRing {
        TcpRing {
            rank,
            world,
            cfg,
            state,
            seq: 0,
            scratch: Vec::new(),
            cpus: HelperCpus::default(),
        }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Opt-in, Linux only: run the two halves of large operations (above 32 KiB) on helper
    /// threads pinned to the given CPUs (`None`: the sender helper is unpinned / the receiving
    /// half runs on the calling thread, the default). The calling thread's own affinity is never
    /// changed.
    ///
    /// On a loopback ring of several processes on one host, the data of each TCP stream is best
    /// copied in and out on the same core; pinning rank r's sender to CPU `c(r)` and its receiver
    /// to `c(r - 1)` (its predecessor's sender CPU) achieves that, see the `bench` example's
    /// `--pin`. With ranks on different hosts this is of no use.
    pub fn set_helper_cpus(
        &mut self,
        send_cpu: Option<usize>,
        recv_cpu: Option<usize>,
    ) -> Result<()> {
        let op = "set_helper_cpus";
        for cpu in [send_cpu, recv_cpu].into_iter().flatten() {
            if cpu >= MAX_CPUS {
                return Err(CollectiveError::InvalidArgument {
                    op,
                    detail: format!("CPU {cpu} out of range (at most {})", MAX_CPUS - 1),
                });
            }
        }
        if cfg!(not(target_os = "linux")) && (send_cpu.is_some() || recv_cpu.is_some()) {
            return Err(CollectiveError::InvalidArgument {
                op,
                detail: "thread pinning is only supported on Linux".into(),
            });
        }
        self.cpus = HelperCpus {
            send: send_cpu,
            recv: recv_cpu,
        };
        Ok(())
    }

    fn invalid(op: Op, detail: String) -> CollectiveError {
        CollectiveError::InvalidArgument {
            op: op.name(),
            detail,
        }
    }

    /// Starts an operation on a multi-rank ring: checks the ring is usable and numbers the op.
    fn begin(&mut self, op: Op) -> Result<Ctx> {
        if let LinkState::Broken(cause) = &self.state {
            return Err(CollectiveError::Poisoned {
                op: op.name(),
                cause: cause.clone(),
            });
        }
        self.seq = self.seq.wrapping_add(1);
        Ok(Ctx {
            op,
            seq: self.seq,
            rank: self.rank,
            next: (self.rank + 1) % self.world,
            prev: (self.rank + self.world - 1) % self.world,
            timeout: self.cfg.timeout,
            segment_bytes: self.cfg.segment_bytes,
            cpus: self.cpus,
        })
    }

    /// Runs one plan; on failure closes the connections and marks the ring broken.
    fn run<T: Pod>(
        &mut self,
        ctx: &Ctx,
        chunks: Vec<&mut [T]>,
        plan: &Plan,
        reduce: Option<Reduce<'_, T>>,
    ) -> Result<()> {
        let res = match &self.state {
            LinkState::Connected(links) => execute(ctx, links, chunks, plan, reduce),
            LinkState::Broken(cause) => Err(CollectiveError::Poisoned {
                op: ctx.op.name(),
                cause: cause.clone(),
            }),
            LinkState::Single => Err(ctx.internal("no links in a single-rank ring")),
        };
        match &res {
            Ok(()) | Err(CollectiveError::Poisoned { .. }) => {}
            Err(e) => {
                tracing::debug!(
                    rank = self.rank,
                    "ring collective failed, closing the ring: {e}"
                );
                // Dropping the links closes both connections, so the neighbours notice promptly.
                self.state = LinkState::Broken(e.to_string());
            }
        }
        res
    }

    /// In-place sum across ranks (ring reduce-scatter + ring all-gather, pipelined in
    /// segments). Any length is allowed, including 0 and lengths below the world size.
    pub fn all_reduce_sum_f32(&mut self, buf: &mut [f32]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let ctx = self.begin(Op::AllReduce)?;
        let chunks = split_sizes(buf, even_sizes(buf.len(), self.world));
        let plan = Plan::all_reduce(self.rank, self.world);
        let mut scratch = std::mem::take(&mut self.scratch);
        let reduce = Reduce {
            scratch: &mut scratch,
            f: add_assign_f32,
        };
        let res = self.run(&ctx, chunks, &plan, Some(reduce));
        self.scratch = scratch;
        res
    }

    /// `output.len()` must equal `input.len() * world`; `output[r*len..(r+1)*len]` receives rank
    /// r's input.
    pub fn all_gather_f32(&mut self, input: &[f32], output: &mut [f32]) -> Result<()> {
        let len = input.len();
        if len.checked_mul(self.world) != Some(output.len()) {
            return Err(Self::invalid(
                Op::AllGather,
                format!(
                    "output has {} elements, expected input length {len} x world size {} ",
                    output.len(),
                    self.world
                ),
            ));
        }
        output[self.rank * len..(self.rank + 1) * len].copy_from_slice(input);
        if self.world == 1 {
            return Ok(());
        }
        let ctx = self.begin(Op::AllGather)?;
        let chunks = split_sizes(output, std::iter::repeat_n(len, self.world));
        self.run(&ctx, chunks, &Plan::all_gather(self.rank, self.world), None)
    }

    /// Variable-length byte all-gather: returns every rank's bytes (index = rank). Sizes are
    /// exchanged first.
    pub fn all_gather_bytes(&mut self, input: &[u8]) -> Result<Vec<Vec<u8>>> {
        if self.world == 1 {
            return Ok(vec![input.to_vec()]);
        }
        let mut ctx = self.begin(Op::AllGatherBytesSizes)?;
        let plan = Plan::all_gather(self.rank, self.world);
        let mut sizes = vec![0u8; 8 * self.world];
        sizes[8 * self.rank..8 * (self.rank + 1)]
            .copy_from_slice(&(input.len() as u64).to_le_bytes());
        let chunks = split_sizes(&mut sizes, std::iter::repeat_n(8, self.world));
        self.run(&ctx, chunks, &plan, None)?;

        let mut out = Vec::with_capacity(self.world);
        for (r, raw) in sizes.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(raw);
            let size = u64::from_le_bytes(b);
            if r == self.rank {
                out.push(input.to_vec());
                continue;
            }
            let Some(size) = usize::try_from(size)
                .ok()
                .filter(|s| *s <= isize::MAX as usize)
            else {
                let err = CollectiveError::Protocol {
                    op: Op::AllGatherBytes.name(),
                    rank: r,
                    detail: format!("announced an impossible size of {size} bytes"),
                };
                self.state = LinkState::Broken(err.to_string());
                return Err(err);
            };
            out.push(vec![0u8; size]);
        }
        ctx.op = Op::AllGatherBytes;
        let chunks = out.iter_mut().map(Vec::as_mut_slice).collect();
        self.run(&ctx, chunks, &plan, None)?;
        Ok(out)
    }

    /// `buf` on `root` is sent to all ranks; elsewhere it is overwritten. Pipelined along the
    /// ring `root -> root+1 -> ...` in segments. Lengths must match on all ranks.
    pub fn broadcast_f32(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        self.broadcast(Op::Broadcast, buf, root)
    }

    /// Byte version of [`TcpRing::broadcast_f32`]; lengths must match on all ranks.
    pub fn broadcast_bytes(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        self.broadcast(Op::BroadcastBytes, buf, root)
    }

    fn broadcast<T: Pod>(&mut self, op: Op, buf: &mut [T], root: usize) -> Result<()> {
        if root >= self.world {
            return Err(Self::invalid(
                op,
                format!("root {root} out of range for world size {}", self.world),
            ));
        }
        if self.world == 1 {
            return Ok(());
        }
        let ctx = self.begin(op)?;
        let plan = Plan::broadcast(self.rank, self.world, root);
        self.run(&ctx, vec![buf], &plan, None)
    }

    /// Returns once every rank has entered the barrier.
    pub fn barrier(&mut self) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let ctx = self.begin(Op::Barrier)?;
        let mut tokens = vec![0u8; self.world];
        let chunks = split_sizes(&mut tokens, std::iter::repeat_n(1, self.world));
        self.run(&ctx, chunks, &Plan::all_gather(self.rank, self.world), None)
    }
}
