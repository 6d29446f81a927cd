//! The plain-HTTP side of the daemon's one port: reading a request head without consuming it (so a WebSocket
//! upgrade can be handed to tungstenite untouched), and the small responses (page, health, metrics, errors).
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The largest request head accepted.
pub const MAX_HEAD: usize = 16 * 1024;

/// A parsed request head.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    /// Length of the head in bytes (to consume it when answering over plain HTTP).
    pub head_len: usize,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// A query parameter's (percent-decoded) value.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then(|| percent_decode(v))
        })
    }

    pub fn is_websocket_upgrade(&self) -> bool {
        self.header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Peeks at the stream until a whole request head is there (without consuming it). `None` for a client
/// that closes, sends garbage or takes longer than `timeout`.
pub async fn peek_request(stream: &TcpStream, timeout: Duration) -> Option<Request> {
    let mut buf = vec![0u8; MAX_HEAD];
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = 0;
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await.ok()?.ok()?;
        if n == 0 {
            return None;
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..n]) {
            Ok(httparse::Status::Complete(head_len)) => {
                let target = req.path.unwrap_or("/");
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                return Some(Request {
                    method: req.method.unwrap_or("").to_string(),
                    path: path.to_string(),
                    query: query.to_string(),
                    headers: req
                        .headers
                        .iter()
                        .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
                        .collect(),
                    head_len,
                });
            }
            Ok(httparse::Status::Partial) if n < MAX_HEAD => {
                if n == last {
                    // Nothing new yet: wait a little for more bytes (peek does not block on partial data).
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                last = n;
            }
            _ => return None,
        }
    }
}

/// Writes a complete HTTP/1.1 response and closes.
pub async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
    extra_headers: &str,
) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         X-Content-Type-Options: nosniff\r\nConnection: close\r\n{extra_headers}\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body).await;
    let _ = stream.shutdown().await;
}

/// Consumes the request head the peek saw, so a response can follow.
pub async fn consume_head(stream: &mut TcpStream, req: &Request) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; req.head_len];
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut buf)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_decoded() {
        let r = Request {
            method: "GET".into(),
            path: "/ws".into(),
            query: "token=a%20b+c&x=1".into(),
            headers: vec![],
            head_len: 0,
        };
        assert_eq!(r.query_param("token").as_deref(), Some("a b c"));
        assert_eq!(r.query_param("x").as_deref(), Some("1"));
        assert_eq!(r.query_param("y"), None);
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
