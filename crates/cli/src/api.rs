//! The per-VM control API: HTTP/JSON on a unix socket (see docs/api.md).

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_vmm::Vm;
use serde_json::json;

use crate::snapshot::{self, SnapshotRequest, VmHandle};

use crate::http::{read_request, write_response, Request, Response};

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Another live process serves this socket.
    #[error("API socket {0} is already in use by another process")]
    InUse(PathBuf),
    /// Something that is not a socket sits at the path.
    #[error("API socket path {0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Binding failed.
    #[error("cannot bind API socket {path}: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A bound API socket; removes the socket file when dropped.
pub struct ApiServer {
    path: PathBuf,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path`, refusing a path that a live server or a non-socket holds.
/// A stale socket left by a dead process is replaced.
pub fn bind(path: &Path) -> Result<(UnixListener, ApiServer), ApiError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ApiError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ApiError::InUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    let l = UnixListener::bind(path).map_err(|e| ApiError::Bind { path: path.to_path_buf(), source: e })?;
    Ok((l, ApiServer { path: path.to_path_buf() }))
}

/// Serves requests until the process ends, one thread per connection.
pub fn serve(listener: UnixListener, vm: Arc<VmHandle>) {
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut stream) = conn else { continue };
                let vm = vm.clone();
                let _ = std::thread::Builder::new().name("api-conn".into()).spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                    let resp = match read_request(&mut stream) {
                        Ok(req) => route(&vm, &req),
                        Err(resp) => resp,
                    };
                    let _ = write_response(&mut stream, &resp);
                });
            }
        })
        .expect("spawn API thread");
}

fn body_json(req: &Request) -> Result<serde_json::Value, Response> {
    if req.body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(json!({}));
    }
    let v: serde_json::Value = serde_json::from_slice(&req.body)
        .map_err(|e| Response::error(400, format!("request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(Response::error(400, "request body must be a JSON object"));
    }
    Ok(v)
}

fn vm_error(e: ferry_vmm::Error) -> Response {
    match e {
        ferry_vmm::Error::WrongState { .. } => Response::error(409, e),
        other => Response::error(500, other),
    }
}

/// Dispatches one request.
pub fn route(handle: &Arc<VmHandle>, req: &Request) -> Response {
    let vm: &Arc<Vm> = &handle.vm;
    let known = ["/vm", "/vm/pause", "/vm/resume", "/vm/shutdown", "/vm/memory-digest", "/vm/console", "/vm/snapshot"];
    let m = req.method.as_str();
    match (m, req.path.as_str()) {
        ("GET", "/vm") => {
            let mut v = serde_json::to_value(vm.status()).unwrap_or_default();
            v["boot_times"] = serde_json::to_value(vm.boot_times()).unwrap_or_default();
            Response::json(200, &v)
        }
        ("PUT", "/vm/pause") => match body_json(req).and_then(|_| vm.pause().map_err(vm_error)) {
            Ok(()) => Response::json(200, &json!({ "state": "paused" })),
            Err(r) => r,
        },
        ("PUT", "/vm/resume") => match body_json(req).and_then(|_| vm.resume().map_err(vm_error)) {
            Ok(()) => Response::json(200, &json!({ "state": "running" })),
            Err(r) => r,
        },
        ("PUT", "/vm/shutdown") => {
            let body = match body_json(req) {
                Ok(b) => b,
                Err(r) => return r,
            };
            let timeout_ms = match body.get("timeout_ms") {
                None => 10_000,
                Some(v) => match v.as_u64() {
                    Some(t) => t,
                    None => return Response::error(400, "timeout_ms must be a non-negative integer (milliseconds)"),
                },
            };
            if vm.status().state == "stopped" {
                return Response::error(409, "VM has already stopped");
            }
            match vm.request_shutdown(Duration::from_millis(timeout_ms)) {
                Ok(()) => Response::json(202, &json!({ "state": "shutting_down", "timeout_ms": timeout_ms })),
                Err(e) => vm_error(e),
            }
        }
        ("GET", "/vm/memory-digest") => {
            let was_paused = vm.is_paused();
            let t0 = Instant::now();
            if let Err(e) = vm.pause() {
                return vm_error(e);
            }
            let t1 = Instant::now();
            let digest = vm.memory_digest();
            let hash_time = t1.elapsed();
            if !was_paused {
                let _ = vm.resume();
            }
            match digest {
                Ok(d) => {
                    let bytes = vm.ram().size();
                    Response::json(
                        200,
                        &json!({
                            "algorithm": "blake3",
                            "digest": d.to_hex().to_string(),
                            "bytes": bytes,
                            "hash_ms": hash_time.as_secs_f64() * 1e3,
                            "pause_ms": if was_paused { 0.0 } else { t0.elapsed().as_secs_f64() * 1e3 },
                            "gb_per_s": bytes as f64 / hash_time.as_secs_f64().max(1e-9) / 1e9,
                        }),
                    )
                }
                Err(e) => vm_error(e),
            }
        }
        ("PUT", "/vm/console") => {
            let body = match body_json(req) {
                Ok(b) => b,
                Err(r) => return r,
            };
            let Some(input) = body.get("input").and_then(|v| v.as_str()) else {
                return Response::error(400, "body must be {\"input\": \"text for the guest's serial console\"}");
            };
            let mut sent = 0;
            let bytes = input.as_bytes();
            let deadline = Instant::now() + Duration::from_secs(5);
            while sent < bytes.len() && Instant::now() < deadline {
                let n = vm.bus().serial_input(&bytes[sent..]);
                sent += n;
                if n == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Response::json(200, &json!({ "sent": sent }))
        }
        ("PUT", "/vm/snapshot") => {
            let req: SnapshotRequest = match serde_json::from_slice(&req.body) {
                Ok(r) => r,
                Err(e) => return Response::error(400, format!("invalid snapshot request: {e}")),
            };
            match snapshot::take(handle, &req) {
                Ok(v) => Response::json(200, &v),
                Err(snapshot::SnapError(status, msg)) => Response::error(status, msg),
            }
        }
        (_, p) if known.contains(&p) => Response::error(405, format!("method {m} not allowed on {p}")),
        (_, p) => Response::error(404, format!("no such endpoint {p}")),
    }
}
