//! Scatter/gather output: I/O vectors whose pieces say where their bytes live, and the
//! buffer responses are encoded into.
//!
//! A [`Chunk`] is heap bytes or bytes of a mapped [`Region`] (a log segment): a transport
//! that must register memory with a NIC (RDMA) learns from the chunk itself which region
//! to register, with no global lookup by address. The Kafka codecs (the `kafka-protocol`
//! crate) encode into any [`ByteBufMut`]; a [`ScatterBuf`] is one that keeps the shared
//! payloads it was given (fetched records, as [`Chunk`]s) by reference: the (patched)
//! codec hands every `Bytes` field over whole through `put_shared`, and the buffer closes
//! its current inline chunk and appends the payload's chunk. The result is an I/O vector
//! the transport writes with one vectored send: headers from the heap, payload straight
//! from the page cache.
//!
//! # Invariants
//! - Shared payloads are taken in the order they were given, which is the order the codec
//!   meets `Bytes` fields (a fetch response has no other). A `Bytes` field that does not
//!   have the next payload's length is copied, and a payload never met counts as copied.
//! - Gaps (`put_gap`/`range`) are addressed in the current inline chunk; the message
//!   codecs never use them (only record-batch encoding does, which we never run here).
#![allow(unsafe_code)]

use bytes::buf::UninitSlice;
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::protocol::buf::ByteBufMut;
use std::ops::Range;
use std::sync::Arc;

use crate::metrics;

/// Mapped memory a device may be asked to read in place (a log segment's mapping).
pub trait Region: Send + Sync {
    /// Where the mapping starts in this process's address space.
    fn base(&self) -> *const u8;
    /// The mapping's length.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A piece of an I/O vector, and where its bytes live.
#[derive(Clone)]
pub enum Chunk {
    /// Heap memory: headers, encoded fields, staged bytes.
    Heap(Bytes),
    /// Bytes inside `region` (which the `Arc` keeps mapped, as `bytes` does).
    Mapped { bytes: Bytes, region: Arc<dyn Region> },
}

impl Chunk {
    pub fn bytes(&self) -> &Bytes {
        match self {
            Chunk::Heap(b) | Chunk::Mapped { bytes: b, .. } => b,
        }
    }

    /// The mapped region the bytes lie in, if any.
    pub fn region(&self) -> Option<&Arc<dyn Region>> {
        match self {
            Chunk::Heap(_) => None,
            Chunk::Mapped { region, .. } => Some(region),
        }
    }

    /// `range` of the chunk, with the same provenance.
    pub fn slice(&self, range: Range<usize>) -> Chunk {
        match self {
            Chunk::Heap(b) => Chunk::Heap(b.slice(range)),
            Chunk::Mapped { bytes, region } => Chunk::Mapped { bytes: bytes.slice(range), region: region.clone() },
        }
    }
}

impl std::ops::Deref for Chunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes()
    }
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Chunk::Heap(b) => write!(f, "Heap({} bytes)", b.len()),
            Chunk::Mapped { bytes, .. } => write!(f, "Mapped({} bytes)", bytes.len()),
        }
    }
}

impl From<Bytes> for Chunk {
    fn from(b: Bytes) -> Chunk {
        Chunk::Heap(b)
    }
}

/// An ordered list of chunks that together form the bytes to send.
pub type IoChunks = Vec<Chunk>;

/// Encoding target that keeps shared payloads by reference. See the module docs.
pub struct ScatterBuf {
    /// The first chunk stays mutable so a length prefix can be patched in at the end.
    head: Option<BytesMut>,
    inline: BytesMut,
    chunks: IoChunks,
    by_ref: Vec<Chunk>,
    next_ref: usize,
}

impl ScatterBuf {
    /// `by_ref`: payloads to pass by reference, in the order the encoder will meet them.
    pub fn new(by_ref: Vec<Chunk>) -> Self {
        ScatterBuf { head: None, inline: BytesMut::with_capacity(256), chunks: Vec::new(), by_ref, next_ref: 0 }
    }

    /// Like [`ScatterBuf::new`], with room for a 4-byte big-endian length prefix that
    /// [`ScatterBuf::finish_framed`] fills in.
    pub fn framed(by_ref: Vec<Chunk>) -> Self {
        let mut b = Self::new(by_ref);
        b.inline.extend_from_slice(&[0; 4]);
        b
    }

    /// The chunks of a frame started with [`ScatterBuf::framed`], its prefix filled in.
    pub fn finish_framed(mut self) -> IoChunks {
        self.count_copied_payloads();
        let total = self.len();
        let mut head = match self.head.take() {
            Some(h) => h,
            None => self.inline.split(),
        };
        let body = (total - 4) as u32;
        head[..4].copy_from_slice(&body.to_be_bytes());
        let mut out = Vec::with_capacity(self.chunks.len() + 2);
        out.push(Chunk::Heap(head.freeze()));
        out.append(&mut self.chunks);
        if !self.inline.is_empty() {
            out.push(Chunk::Heap(self.inline.freeze()));
        }
        out
    }

    /// Registered payloads the encoder did not hand over whole (`put_shared`) were
    /// copied, if encoded at all, and the copy counter must say so.
    fn count_copied_payloads(&self) {
        let copied = self.unmatched_bytes();
        if copied > 0 {
            metrics::count_copy(metrics::Path::FetchOut, copied);
        }
    }

    /// Bytes of registered payloads not (yet) kept by reference.
    pub fn unmatched_bytes(&self) -> usize {
        self.by_ref[self.next_ref..].iter().map(|c| c.len()).sum()
    }

    fn close_inline(&mut self) {
        if self.inline.is_empty() {
            return;
        }
        if self.head.is_none() && self.chunks.is_empty() {
            self.head = Some(self.inline.split());
        } else {
            self.chunks.push(Chunk::Heap(self.inline.split().freeze()));
        }
    }

    /// Total bytes written so far, inline and by reference.
    pub fn len(&self) -> usize {
        self.head.as_ref().map_or(0, |h| h.len())
            + self.chunks.iter().map(|c| c.len()).sum::<usize>()
            + self.inline.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The chunks, in order.
    pub fn finish(mut self) -> IoChunks {
        self.count_copied_payloads();
        self.close_inline();
        let mut out: IoChunks = self.head.take().map(|h| Chunk::Heap(h.freeze())).into_iter().collect();
        out.append(&mut self.chunks);
        out
    }
}

// SAFETY: every method that hands out or advances over uninitialised memory delegates to
// the inner `BytesMut`, whose own `BufMut` implementation upholds the trait's contract;
// `put_slice` only appends through safe calls.
unsafe impl BufMut for ScatterBuf {
    fn remaining_mut(&self) -> usize {
        self.inline.remaining_mut()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        // SAFETY: the caller guarantees `cnt` bytes of `chunk_mut()` were initialised, and
        // `chunk_mut()` is the inner buffer's.
        unsafe { self.inline.advance_mut(cnt) }
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        self.inline.chunk_mut()
    }

    fn put_slice(&mut self, src: &[u8]) {
        self.inline.extend_from_slice(src);
    }
}

impl ByteBufMut for ScatterBuf {
    fn put_shared(&mut self, bytes: &Bytes) {
        match self.by_ref.get(self.next_ref) {
            Some(next) if !bytes.is_empty() && next.len() == bytes.len() => {
                let next = next.clone();
                self.close_inline();
                self.chunks.push(next);
                self.next_ref += 1;
                metrics::count_zero_copy(bytes.len());
            }
            _ => self.inline.extend_from_slice(bytes),
        }
    }

    fn offset(&self) -> usize {
        self.inline.len()
    }

    fn seek(&mut self, offset: usize) {
        self.inline.resize(offset, 0);
    }

    fn range(&mut self, r: Range<usize>) -> &mut [u8] {
        &mut self.inline[r]
    }
}

/// Receives at most `len` bytes from the socket `fd` into `buf`'s spare capacity, without
/// zero-filling it first (a 64 KiB memset per read was a sixth of a busy core's time).
/// Returns the bytes received (0: the peer closed its side).
pub fn recv_into(buf: &mut BytesMut, fd: &impl std::os::fd::AsRawFd, len: usize) -> std::io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    let len = len.min(spare.len());
    // SAFETY: recv(2) writes at most `len` bytes at the start of the spare capacity, which
    // is valid for writes of `len` bytes; it reads nothing there.
    let n = unsafe { libc::recv(fd.as_raw_fd(), spare.as_mut_ptr().cast(), len, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the kernel initialised exactly `n <= len` bytes past the current length.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// Hands the allocator's free memory back to the kernel. glibc's malloc keeps what was
/// freed in its arenas (the receive buffers of thousands of connections that closed, say)
/// until asked; `malloc_trim` returns every whole free page of every arena.
pub fn return_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointers and only walks the allocator's own arenas
    // under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Total length of a chunk list.
pub fn chunks_len(chunks: &[Chunk]) -> usize {
    chunks.iter().map(|c| c.len()).sum()
}

/// Anonymous, page-aligned memory the kernel or a NIC reads and writes behind our back
/// (io_uring provided buffers, RDMA receive buffers and landing rings). Only raw pointers
/// are handed out: whoever reads through one must know the device is not writing there.
pub struct AnonMap {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone; moving it moves the only handle.
unsafe impl Send for AnonMap {}
// SAFETY: `&AnonMap` only gives out raw pointers; reading through them is the caller's
// (unsafe) business.
unsafe impl Sync for AnonMap {}

impl AnonMap {
    pub fn new(len: usize) -> std::io::Result<Self> {
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing;
        // the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len.max(1),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(p.cast()).ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(AnonMap { ptr, len: len.max(1) })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `[off, off + len)` as a slice.
    ///
    /// # Safety
    /// Nothing (kernel, NIC, remote peer, other code) may write that range while the slice
    /// lives.
    pub unsafe fn slice(&self, off: usize, len: usize) -> &[u8] {
        assert!(off.checked_add(len).is_some_and(|e| e <= self.len), "range outside the mapping");
        // SAFETY: in bounds (asserted); the caller rules out concurrent writes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(off), len) }
    }

    /// Copies `src` to `off`.
    ///
    /// # Safety
    /// Nothing else may read or write that range meanwhile (no request naming it is
    /// posted to a device).
    pub unsafe fn write(&self, off: usize, src: &[u8]) {
        assert!(off.checked_add(src.len()).is_some_and(|e| e <= self.len), "range outside the mapping");
        // SAFETY: in bounds (asserted); exclusive by the caller's promise.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(off), src.len()) };
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        // SAFETY: created by `new` with this length; owners outlive every use by devices.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// An append-only block of anonymous memory: bytes once appended are never written
/// again, so views of them ([`Chunk::Mapped`], region = the block) can be handed out
/// freely and outlive the block's owner (the `Arc` keeps the mapping). The sidecar's tail
/// cache keeps fetched record batches in these.
pub struct AppendBlock {
    map: AnonMap,
    /// Bytes appended so far; only `append` moves it, under the lock.
    filled: std::sync::Mutex<usize>,
}

/// A view of appended bytes: what `Bytes::from_owner` holds.
struct AppendView {
    block: Arc<AppendBlock>,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for AppendView {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `[start, start + len)` was appended (it lies below `filled`, checked when
        // the view was made) and appended bytes are never written again.
        unsafe { self.block.map.slice(self.start, self.len) }
    }
}

impl AppendBlock {
    pub fn new(capacity: usize) -> std::io::Result<Arc<AppendBlock>> {
        Ok(Arc::new(AppendBlock { map: AnonMap::new(capacity)?, filled: std::sync::Mutex::new(0) }))
    }

    pub fn capacity(&self) -> usize {
        self.map.len()
    }

    /// Appends `src` if it fits, returning where in the block it now lies ([`view`]
    /// hands it out); `None` if full.
    ///
    /// [`view`]: AppendBlock::view
    pub fn append(&self, src: &[u8]) -> Option<usize> {
        let mut filled = self.filled.lock().unwrap_or_else(|p| p.into_inner());
        let start = *filled;
        let end = start.checked_add(src.len()).filter(|e| *e <= self.map.len())?;
        // SAFETY: `[start, end)` lies past every byte appended before (no view names it)
        // and the lock keeps other appenders out; the mapping is ours alone.
        unsafe { self.map.write(start, src) };
        *filled = end;
        Some(start)
    }
}

impl AppendBlock {
    /// A view of `[start, start + len)`, if all of it was appended.
    pub fn view(self: &Arc<Self>, start: usize, len: usize) -> Option<Chunk> {
        let filled = *self.filled.lock().unwrap_or_else(|p| p.into_inner());
        start.checked_add(len).filter(|e| *e <= filled)?;
        let bytes = Bytes::from_owner(AppendView { block: self.clone(), start, len });
        Some(Chunk::Mapped { bytes, region: self.clone() })
    }
}

impl Region for AppendBlock {
    fn base(&self) -> *const u8 {
        self.map.as_ptr()
    }
    fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(Vec<u8>);
    impl Region for Fake {
        fn base(&self) -> *const u8 {
            self.0.as_ptr()
        }
        fn len(&self) -> usize {
            self.0.len()
        }
    }

    fn mapped(n: usize) -> Chunk {
        let region: Arc<dyn Region> = Arc::new(Fake(vec![0; n]));
        Chunk::Mapped { bytes: Bytes::from(vec![7u8; n]), region }
    }

    #[test]
    fn shared_payload_is_kept_by_reference_with_its_region() {
        let payload = mapped(1000);
        let mut buf = ScatterBuf::new(vec![payload.clone()]);
        buf.put_i32(1000);
        buf.put_shared(payload.bytes());
        buf.put_slice(b"tail");
        assert_eq!(buf.unmatched_bytes(), 0);
        let chunks = buf.finish();
        assert_eq!(chunks.len(), 3);
        assert!(chunks[1].region().is_some() && chunks[0].region().is_none());
        assert_eq!(chunks[1].as_ptr(), payload.as_ptr());
        assert_eq!(&chunks[2][..], b"tail");
        assert_eq!(chunks_len(&chunks), 4 + 1000 + 4);
    }

    #[test]
    fn framed_prefix_counts_everything_after_it() {
        let payload = mapped(300);
        let mut buf = ScatterBuf::framed(vec![payload.clone()]);
        buf.put_i16(7);
        buf.put_shared(payload.bytes());
        buf.put_u8(9);
        let chunks = buf.finish_framed();
        assert_eq!(&chunks[0][..4], &(2u32 + 300 + 1).to_be_bytes());
        assert_eq!(chunks_len(&chunks), 4 + 2 + 300 + 1);
    }

    #[test]
    fn bytes_that_are_not_the_next_payload_are_copied() {
        let mut buf = ScatterBuf::new(vec![mapped(8)]);
        // A shared field of another length, and plain slices, are copied inline.
        buf.put_shared(&Bytes::from(vec![1u8; 5]));
        buf.put_slice(&[7u8; 8]);
        // The registered payload was never met: it counts as copied.
        assert_eq!(buf.unmatched_bytes(), 8);
        assert_eq!(buf.finish().len(), 1);
    }

    /// Through the real codec: a fetch response's records go out by reference.
    #[test]
    fn the_codec_hands_fetched_records_over_whole() {
        use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
        use kafka_protocol::messages::FetchResponse;
        use kafka_protocol::protocol::Encodable;
        let (a, b) = (mapped(64), mapped(64));
        let mut resp = FetchResponse::default();
        let mut t = FetchableTopicResponse::default();
        for c in [&a, &b] {
            let mut p = PartitionData::default();
            p.records = Some(c.bytes().clone());
            t.partitions.push(p);
        }
        resp.responses.push(t);
        for version in [4, 12] {
            let mut buf = ScatterBuf::new(vec![a.clone(), b.clone()]);
            resp.encode(&mut buf, version).expect("encode");
            assert_eq!(buf.unmatched_bytes(), 0, "v{version}");
            let chunks = buf.finish();
            let mapped: Vec<_> = chunks.iter().filter(|c| c.region().is_some()).collect();
            assert_eq!(mapped.len(), 2, "v{version}");
            assert_eq!(mapped[0].as_ptr(), a.as_ptr());
            assert_eq!(mapped[1].as_ptr(), b.as_ptr());
        }
    }

    #[test]
    fn appended_bytes_stay_as_they_were_and_views_outlive_the_block() {
        let block = AppendBlock::new(4096).expect("map");
        assert_eq!(block.append(b"first"), Some(0));
        assert_eq!(block.append(&[7u8; 100]), Some(5));
        assert!(block.append(&vec![0u8; 4096]).is_none(), "over capacity");
        assert_eq!(block.append(b"last"), Some(105));
        let (a, b, c) = (block.view(0, 5).expect("a"), block.view(5, 100).expect("b"), block.view(105, 4).expect("c"));
        let run = block.view(0, 105).expect("appended");
        assert!(block.view(100, 10).is_none(), "past what was appended");
        drop(block);
        assert_eq!(&run[..5], b"first");
        assert_eq!(&run[5..], &[7u8; 100][..]);
        assert_eq!(&a[..], b"first");
        assert_eq!(&b[..], &[7u8; 100][..]);
        assert_eq!(&c[..], b"last");
        let region = a.region().expect("mapped");
        assert_eq!(a.as_ptr(), region.base(), "the first append starts the block");
    }
}
