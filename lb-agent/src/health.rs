//! HTTP health endpoints: one per `healthCheckNodePort` (kube-proxy's semantics: 200 with the
//! Service and its local endpoint count while this node has local endpoints, 503 otherwise),
//! and the node's own (`--health-addr`, for the DaemonSet's probes).

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tracing::{info, warn};

use crate::model::HealthCheck;

/// What an endpoint answers: HTTP status and JSON body.
pub type Answer = Arc<Mutex<(u16, String)>>;

/// A non-blocking listener for tokio, bound synchronously so that a taken port is an error
/// at start-up rather than in a task.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// Serves `answer` on `addr` until the returned task is aborted.
pub fn serve(addr: SocketAddr, answer: Answer) -> std::io::Result<JoinHandle<()>> {
    let listener = bind(addr)?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                // Any path answers: probes only look at the status.
                if read_request(&mut stream).await.is_none() {
                    return;
                }
                let (status, body) = answer
                    .lock()
                    .map(|a| a.clone())
                    .unwrap_or((500, String::new()));
                let _ = write_response(&mut stream, status, "application/json", &body).await;
            });
        }
    }))
}

/// Reads an HTTP request head (bounded in size and time) and returns its path.
pub async fn read_request(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        std::io::Result::Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(2), read).await {
        Ok(Ok(())) => {}
        _ => return None,
    }
    let line = head.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let path = line.split_whitespace().nth(1)?;
    // `/metrics?x=y` is `/metrics`.
    Some(path.split('?').next().unwrap_or(path).to_string())
}

/// Writes a complete HTTP/1.1 response and closes the stream.
pub async fn write_response(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn service_answer(check: &HealthCheck) -> (u16, String) {
    let body = serde_json::json!({
        "service": {"namespace": check.namespace, "name": check.name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": true,
    });
    let status = if check.local_endpoints > 0 { 200 } else { 503 };
    (status, body.to_string())
}

/// The health-check NodePorts currently served.
#[derive(Default)]
pub struct HealthCheckServers {
    servers: HashMap<u16, (Answer, JoinHandle<()>)>,
}

impl HealthCheckServers {
    /// Serves exactly `wanted`: new ports opened, answers updated, gone ones closed.
    pub fn sync(&mut self, wanted: &BTreeMap<u16, HealthCheck>) {
        self.servers.retain(|port, (_, task)| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
                info!(port, "health-check NodePort closed");
            }
            keep
        });
        for (&port, check) in wanted {
            let answer = service_answer(check);
            match self.servers.get(&port) {
                Some((current, _)) => {
                    if let Ok(mut current) = current.lock() {
                        *current = answer;
                    }
                }
                None => {
                    let shared: Answer = Arc::new(Mutex::new(answer));
                    match serve(SocketAddr::from(([0, 0, 0, 0], port)), shared.clone()) {
                        Ok(task) => {
                            info!(port, service = %format!("{}/{}", check.namespace, check.name), "health-check NodePort open");
                            self.servers.insert(port, (shared, task));
                        }
                        Err(err) => warn!(port, "cannot serve the health-check NodePort: {err}"),
                    }
                }
            }
        }
    }
}
