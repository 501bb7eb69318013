use super::*;
use std::io::{Read, Write};

fn accept(t: &mut UringTransport) -> ConnId {
    let mut out = Vec::new();
    for _ in 0..100 {
        t.poll(Some(Duration::from_millis(50)), &mut out).expect("poll");
        if let Some(Completion::Accepted { conn, .. }) = out.drain(..).next() {
            return conn;
        }
    }
    panic!("no connection accepted");
}

/// Multishot mode: a peer that sends far more than the dispatch loop takes is paused
/// at the staging limit (memory stays bounded), and once the loop reads again every
/// byte arrives, in order, across the pause and resume.
#[test]
fn multishot_receive_pauses_a_fast_sender_and_loses_nothing() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let opts = UringOptions { recv_multishot: true, ..UringOptions::default() };
    let mut t = UringTransport::new(vec![listener], opts).expect("io_uring");
    assert!(t.bufring.is_some(), "multishot receive not available on this kernel");
    const TOTAL: usize = 8 << 20;
    let writer = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        let data: Vec<u8> = (0..TOTAL).map(|i| (i % 251) as u8).collect();
        s.write_all(&data).expect("write");
        let mut b = [0u8; 1];
        let _ = s.read(&mut b); // keep the socket open until the reader is done
    });
    let conn = accept(&mut t);
    // One small receive, then nobody reads for a while: the sender fills the socket
    // buffers and the transport stages at most about STAGED_PAUSE_AT.
    t.recv(conn, BytesMut::with_capacity(1024), 1024);
    let mut out = Vec::new();
    let until = Instant::now() + Duration::from_millis(500);
    let mut got: Vec<u8> = Vec::new();
    while Instant::now() < until {
        t.poll(Some(Duration::from_millis(20)), &mut out).expect("poll");
        for c in out.drain(..) {
            if let Completion::Received { buf, .. } = c {
                got.extend_from_slice(&buf);
            }
        }
    }
    let staged = t.conns[&conn].rx.staged_len();
    assert!(staged >= STAGED_PAUSE_AT, "the sender should have outrun the reader: {staged} staged");
    assert!(staged < STAGED_PAUSE_AT + 2 * BUF_RING_BUF_SIZE * BUF_RING_ENTRIES as usize, "{staged} staged");
    // Now read everything.
    let mut buf = Some(BytesMut::new());
    let until = Instant::now() + Duration::from_secs(20);
    while got.len() < TOTAL && Instant::now() < until {
        if let Some(b) = buf.take() {
            t.recv(conn, b, 256 * 1024); // at most one receive outstanding
        }
        t.poll(Some(Duration::from_millis(20)), &mut out).expect("poll");
        for c in out.drain(..) {
            if let Completion::Received { buf: mut b, .. } = c {
                got.extend_from_slice(&b);
                b.clear();
                buf = Some(b);
            }
        }
    }
    assert_eq!(got.len(), TOTAL);
    assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8), "bytes out of order");
    t.close(conn);
    drop(t);
    writer.join().expect("writer");
}
