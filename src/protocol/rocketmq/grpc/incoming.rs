//! The gRPC front's connections: plain TCP, or TLS over it with the same reloadable
//! server configuration as the dispatch loop's TLS listeners (`crate::tls`). Each
//! handshake runs on a task of its own, so a slow or hostile one never holds up accepting.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::tls::ServerTls;

/// A client that has not finished its handshake by then is closed.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// One accepted connection.
pub enum GrpcIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for GrpcIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            GrpcIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            GrpcIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for GrpcIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            GrpcIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            GrpcIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            GrpcIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            GrpcIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            GrpcIo::Plain(s) => s.is_write_vectored(),
            GrpcIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            GrpcIo::Plain(s) => Pin::new(s).poll_flush(cx),
            GrpcIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            GrpcIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            GrpcIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Connected for GrpcIo {
    // The TCP addresses either way: handlers read the peer with `Request::remote_addr`.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            GrpcIo::Plain(s) => s.connect_info(),
            GrpcIo::Tls(s) => s.get_ref().0.connect_info(),
        }
    }
}

/// Accepted connections, handshaken when `tls` is given; runs on the caller's runtime.
pub fn incoming(listener: TcpListener, tls: Option<Arc<ServerTls>>) -> UnboundedReceiverStream<io::Result<GrpcIo>> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (socket, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, usually: wait rather than spin.
                    log::warn!(reason:% = e; "rocketmq-grpc: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Small answers go out at once (the remoting and Kafka paths do the same).
            let _ = socket.set_nodelay(true);
            let Some(tls) = &tls else {
                if tx.send(Ok(GrpcIo::Plain(socket))).is_err() {
                    return;
                }
                continue;
            };
            let (acceptor, tx) = (tokio_rustls::TlsAcceptor::from(tls.current()), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE, acceptor.accept(socket)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(GrpcIo::Tls(Box::new(s))));
                    }
                    Ok(Err(e)) => log::warn!(peer:% = peer, reason:% = e; "rocketmq-grpc: closing connection: TLS"),
                    Err(_) => log::warn!(peer:% = peer; "rocketmq-grpc: closing connection: TLS handshake timed out"),
                }
            });
        }
    });
    UnboundedReceiverStream::new(rx)
}
