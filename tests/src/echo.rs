//! Echo servers that answer with their own name and the peer address they saw, and the
//! matching bounded clients.
//!
//! Reply format, one line per request: `<server-name> <peer-ip>:<peer-port>`.

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use anyhow::{bail, Context as _};

use crate::lab::Netns;

/// How often blocked server threads look at the stop flag.
const POLL: Duration = Duration::from_millis(100);

/// TCP and UDP echo servers on one port of one namespace; stopped on drop.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

/// A reply as the client parsed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub server: String,
    /// The client address the server saw.
    pub peer: SocketAddr,
}

impl Reply {
    fn parse(line: &str) -> anyhow::Result<Self> {
        let mut parts = line.split_whitespace();
        let (Some(server), Some(peer), None) = (parts.next(), parts.next(), parts.next()) else {
            bail!("malformed reply {line:?}");
        };
        Ok(Self {
            server: server.to_string(),
            peer: peer
                .parse()
                .with_context(|| format!("peer in reply {line:?}"))?,
        })
    }
}

fn set_accept_timeout(listener: &TcpListener, timeout: Duration) -> anyhow::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: valid socket fd and a correctly sized timeval. SO_RCVTIMEO bounds accept().
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_RCVTIMEO on listener");
    }
    Ok(())
}

impl EchoServer {
    /// Starts TCP and UDP echo servers on `0.0.0.0:port` inside `ns`, answering as `name`.
    pub fn start(ns: &Netns, name: &str, port: u16) -> anyhow::Result<Self> {
        let sockets = ns.run(move || bind(port))?;
        Ok(Self::serve(sockets, name))
    }

    /// Same, in the calling thread's own namespace.
    pub fn start_here(name: &str, port: u16) -> anyhow::Result<Self> {
        Ok(Self::serve(bind(port)?, name))
    }

    fn serve((tcp, udp): (TcpListener, UdpSocket), name: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            let stop = stop.clone();
            let name = name.to_string();
            threads.push(thread::spawn(move || serve_tcp(tcp, &name, &stop)));
        }
        {
            let stop = stop.clone();
            let name = name.to_string();
            threads.push(thread::spawn(move || serve_udp(udp, &name, &stop)));
        }
        Self { stop, threads }
    }
}

fn bind(port: u16) -> anyhow::Result<(TcpListener, UdpSocket)> {
    let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
    let tcp = TcpListener::bind(any).with_context(|| format!("binding TCP echo on {any}"))?;
    set_accept_timeout(&tcp, POLL)?;
    let udp = UdpSocket::bind(any).with_context(|| format!("binding UDP echo on {any}"))?;
    udp.set_read_timeout(Some(POLL))?;
    Ok((tcp, udp))
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn serve_tcp(listener: TcpListener, name: &str, stop: &Arc<AtomicBool>) {
    let mut connections = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let Ok((stream, peer)) = listener.accept() else {
            continue; // timeout: look at the stop flag again
        };
        let stop = stop.clone();
        let name = name.to_string();
        connections.push(thread::spawn(move || {
            let _ = serve_connection(stream, peer, &name, &stop);
        }));
        connections.retain(|c| !c.is_finished());
    }
    for connection in connections {
        let _ = connection.join();
    }
}

fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    name: &str,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(POLL))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return Ok(()), // client closed
            Ok(_) if line.ends_with('\n') => {
                writer.write_all(format!("{name} {peer}\n").as_bytes())?;
                line.clear();
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn serve_udp(socket: UdpSocket, name: &str, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let Ok((_, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let _ = socket.send_to(format!("{name} {peer}\n").as_bytes(), peer);
    }
}

/// One TCP connection: connect, one request, one reply, close.
pub fn tcp_request(to: SocketAddr, timeout: Duration) -> anyhow::Result<Reply> {
    let mut session = TcpSession::connect(to, timeout)?;
    session.request()
}

/// One TCP connection like [`tcp_request`], from the source address `from` (one of the
/// calling namespace's own addresses): many clients from one namespace.
pub fn tcp_request_from(
    from: Ipv4Addr,
    to: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<Reply> {
    tcp_request_from_port(from, 0, to, timeout)
}

/// Same, from a fixed source port too (`0`: any): the same 5-tuple again, as a new
/// connection (the namespace needs `net.ipv4.tcp_tw_reuse` for the port's TIME_WAIT).
pub fn tcp_request_from_port(
    from: Ipv4Addr,
    port: u16,
    to: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<Reply> {
    tcp_session_from_port(from, port, to, timeout)?.request()
}

/// A connection from `from:port` left open (a closed one leaves no conntrack entry to
/// inspect).
pub fn tcp_session_from_port(
    from: Ipv4Addr,
    port: u16,
    to: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<TcpSession> {
    use std::os::fd::FromRawFd as _;
    let SocketAddr::V4(to4) = to else {
        bail!("{to}: IPv4 only");
    };
    let sockaddr = |addr: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a fresh socket, owned by the TcpStream below (closed with it, also on error).
    let stream = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket");
        }
        TcpStream::from_raw_fd(fd)
    };
    // Bounds connect() too (Linux applies the send timeout to it).
    stream.set_write_timeout(Some(timeout))?;
    stream.set_read_timeout(Some(timeout))?;
    let local = sockaddr(from, port);
    let remote = sockaddr(*to4.ip(), to4.port());
    // SAFETY: valid sockaddr_in values, option and lengths, on a socket this function owns.
    unsafe {
        let one: libc::c_int = 1;
        // A port of ours in TIME_WAIT may be bound again.
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        if libc::bind(
            stream.as_raw_fd(),
            (&local as *const libc::sockaddr_in).cast(),
            len,
        ) != 0
        {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("binding {from}"));
        }
        if libc::connect(
            stream.as_raw_fd(),
            (&remote as *const libc::sockaddr_in).cast(),
            len,
        ) != 0
        {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("connecting from {from} to {to}"));
        }
    }
    TcpSession::from_stream(stream)
}

/// One UDP exchange from a fresh socket (so a fresh source port, a fresh flow).
pub fn udp_request(to: SocketAddr, timeout: Duration) -> anyhow::Result<Reply> {
    let socket = UdpSocket::bind("0.0.0.0:0").context("binding UDP client")?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send_to(b"hello\n", to).context("sending UDP")?;
    let mut buf = [0u8; 512];
    let (n, from) = socket
        .recv_from(&mut buf)
        .with_context(|| format!("no UDP reply from {to} within {timeout:?}"))?;
    if from != to {
        bail!("UDP reply came from {from}, not from {to} (reverse NAT missing)");
    }
    Reply::parse(String::from_utf8_lossy(&buf[..n]).trim())
}

/// A long-lived TCP connection that can carry many requests.
pub struct TcpSession {
    stream: BufReader<TcpStream>,
    pub local: SocketAddr,
}

impl TcpSession {
    pub fn connect(to: SocketAddr, timeout: Duration) -> anyhow::Result<Self> {
        let stream = TcpStream::connect_timeout(&to, timeout)
            .with_context(|| format!("connecting to {to}"))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Self::from_stream(stream)
    }

    fn from_stream(stream: TcpStream) -> anyhow::Result<Self> {
        let local = stream.local_addr()?;
        Ok(Self {
            stream: BufReader::new(stream),
            local,
        })
    }

    pub fn request(&mut self) -> anyhow::Result<Reply> {
        self.stream
            .get_mut()
            .write_all(b"hello\n")
            .context("sending request")?;
        let mut line = String::new();
        let n = self.stream.read_line(&mut line).context("reading reply")?;
        if n == 0 {
            bail!("connection closed by the peer");
        }
        Reply::parse(line.trim())
    }

    /// What `getpeername` says this connection is connected to.
    pub fn peer(&self) -> std::io::Result<SocketAddr> {
        self.stream.get_ref().peer_addr()
    }
}

/// An echo server on `port` in each backend of `lab`, answering as `backend-<i>`.
pub fn start_backends(lab: &crate::lab::NodeLab, port: u16) -> anyhow::Result<Vec<EchoServer>> {
    lab.backends
        .iter()
        .enumerate()
        .map(|(i, ns)| EchoServer::start(ns, &format!("backend-{}", i + 1), port))
        .collect()
}

/// One request on a connected UDP socket (the same flow every time); the server's name.
pub fn udp_ask(socket: &UdpSocket) -> anyhow::Result<String> {
    socket.send(b"hello\n").context("sending UDP")?;
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).context("no UDP reply")?;
    Ok(Reply::parse(String::from_utf8_lossy(&buf[..n]).trim())?.server)
}

/// `GET /` to `addr` from inside `ns`: the HTTP status and body.
pub fn http_get(ns: &Netns, addr: &str) -> anyhow::Result<(u16, String)> {
    http_get_path(ns, addr, "/")
}

/// `GET path` to `addr` from inside `ns`: the HTTP status and body.
pub fn http_get_path(ns: &Netns, addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::Read;
    let addr: SocketAddr = addr.parse()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: lb\r\n\r\n");
    ns.run(move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(request.as_bytes())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no status in {response:?}"))?;
        let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        Ok((status, body))
    })
}
