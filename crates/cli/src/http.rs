//! A minimal HTTP/1.1 layer over unix sockets for the per-VM control API:
//! one request per connection, JSON bodies, bounded sizes, and errors that
//! come back as JSON with a 4xx status instead of a dropped connection.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Largest request head (request line and headers) the server accepts.
pub const MAX_HEAD: usize = 16 << 10;

/// Largest request body the server accepts.
pub const MAX_BODY: usize = 1 << 20;

/// Largest response the CLI reads from an API socket.
pub const MAX_RESPONSE: usize = 16 << 20;

/// Time a client has to send one whole request: a client that dribbles
/// bytes (slowloris) loses its connection instead of holding a slot.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// A parsed request.
#[derive(Debug)]
pub struct Request {
    /// HTTP method.
    pub method: String,
    /// Path without query.
    pub path: String,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// A response about to be sent.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// JSON body (empty for 204).
    pub body: String,
    /// Methods the path allows, sent as `Allow` (RFC 9110 requires it on 405).
    pub allow: Option<&'static str>,
}

impl Response {
    /// A JSON response.
    pub fn json(status: u16, value: &impl serde::Serialize) -> Self {
        Response { status, body: serde_json::to_string(value).unwrap_or_default(), allow: None }
    }

    /// An error response with `{"error": .., "status": ..}`.
    pub fn error(status: u16, msg: impl std::fmt::Display) -> Self {
        Response::json(status, &serde_json::json!({ "error": msg.to_string(), "status": status }))
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Parses a Content-Length value strictly: ASCII digits only (no sign, no
/// spaces inside, no list), so that two parsers can never disagree on where
/// the body ends.
fn parse_content_length(v: &[u8]) -> Option<usize> {
    let v = std::str::from_utf8(v).ok()?.trim_matches(|c| c == ' ' || c == '\t');
    if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// Reads with what is left of the request deadline as the socket timeout.
fn read_some(stream: &mut UnixStream, buf: &mut [u8], deadline: std::time::Instant) -> Result<usize, Response> {
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    if left.is_zero() {
        return Err(Response::error(408, format!("request not complete within {} s", REQUEST_DEADLINE.as_secs())));
    }
    let _ = stream.set_read_timeout(Some(left));
    stream.read(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            Response::error(408, format!("request not complete within {} s", REQUEST_DEADLINE.as_secs()))
        }
        _ => Response::error(400, format!("reading request: {e}")),
    })
}

/// Reads one request; `Err(Response)` is the error to send back.
pub fn read_request(stream: &mut UnixStream) -> Result<Request, Response> {
    let deadline = std::time::Instant::now() + REQUEST_DEADLINE;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_len = loop {
        let n = read_some(stream, &mut chunk, deadline)?;
        if n == 0 {
            return Err(Response::error(400, "connection closed before a complete request head"));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => break len,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                return Err(Response::error(431, format!("request head larger than {MAX_HEAD} bytes")));
            }
            Ok(httparse::Status::Partial) => continue,
            Err(e) => return Err(Response::error(400, format!("malformed HTTP request: {e}"))),
        }
    };
    if head_len > MAX_HEAD {
        return Err(Response::error(431, format!("request head of {head_len} bytes is larger than {MAX_HEAD}")));
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(&buf).map_err(|e| Response::error(400, format!("malformed HTTP request: {e}")))?;
    let method = req.method.unwrap_or("").to_string();
    let target = req.path.unwrap_or("/").to_string();
    let mut content_length: Option<usize> = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = parse_content_length(h.value).ok_or_else(|| {
                Response::error(
                    400,
                    format!("invalid Content-Length {:?}: expected decimal digits", String::from_utf8_lossy(h.value)),
                )
            })?;
            if content_length.is_some() {
                return Err(Response::error(400, "more than one Content-Length header"));
            }
            content_length = Some(v);
        }
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Response::error(400, "chunked transfer encoding is not supported; send Content-Length"));
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > MAX_BODY {
        return Err(Response::error(413, format!("request body of {content_length} bytes is larger than {MAX_BODY}")));
    }
    let mut body = buf[head_len..].to_vec();
    while body.len() < content_length {
        let n = read_some(stream, &mut chunk, deadline)?;
        if n == 0 {
            return Err(Response::error(400, format!("body ended after {} of {content_length} bytes", body.len())));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(content_length);
    // Queries are not part of the API; ignore them rather than 404.
    let path = target.split('?').next().unwrap_or("/").to_string();
    Ok(Request { method, path, body })
}

/// Writes a response and closes the exchange.
pub fn write_response(stream: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let allow = r.allow.map(|a| format!("Allow: {a}\r\n")).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(r.body.as_bytes())?;
    stream.flush()
}

/// Errors talking to a VM's API socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot connect to API socket {path}: {source} (is `ferry run --api-sock {path}` running?)")]
    Connect {
        /// Socket path.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The exchange failed midway.
    #[error("API request failed: {0}")]
    Io(#[from] std::io::Error),
    /// The reply was not HTTP.
    #[error("malformed API response: {0}")]
    Malformed(String),
    /// The server answered with an error status.
    #[error("API error {status}: {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The server's error text.
        message: String,
    },
}

/// Sends one request to the API socket and returns the JSON body (Null for 204).
pub fn request(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<serde_json::Value, ClientError> {
    let mut s =
        UnixStream::connect(sock).map_err(|e| ClientError::Connect { path: sock.display().to_string(), source: e })?;
    s.set_read_timeout(Some(timeout))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes())?;
    // Bounded: a socket that is not ferry's could send without end.
    let mut out = Vec::new();
    (&mut s).take(MAX_RESPONSE as u64 + 1).read_to_end(&mut out)?;
    if out.len() > MAX_RESPONSE {
        return Err(ClientError::Malformed(format!("response larger than {MAX_RESPONSE} bytes")));
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(&out) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if out.is_empty() => {
            return Err(ClientError::Malformed("the VMM closed the connection without answering (did it exit?)".into()))
        }
        Ok(httparse::Status::Partial) => return Err(ClientError::Malformed("truncated response head".into())),
        Err(e) => return Err(ClientError::Malformed(e.to_string())),
    };
    let status = resp.code.unwrap_or(0);
    let text = &out[head_len..];
    let value: serde_json::Value = if text.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(text).map_err(|e| ClientError::Malformed(format!("body is not JSON: {e}")))?
    };
    if status >= 400 {
        let message = value.get("error").and_then(|e| e.as_str()).unwrap_or("").to_string();
        return Err(ClientError::Status { status, message });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::parse_content_length;

    #[test]
    fn content_length_is_digits_only() {
        assert_eq!(parse_content_length(b"20"), Some(20));
        assert_eq!(parse_content_length(b" 7 "), Some(7));
        for bad in [&b"+20"[..], b"-1", b"2 0", b"0x10", b"", b"20, 20", b"99999999999999999999"] {
            assert_eq!(parse_content_length(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
