//! The per-VM control API: HTTP/JSON on a unix socket (see docs/api.md).

use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::OnceLock;

use ferry_migrate::migration::{IncomingHandle, MigrateRequest};
use ferry_migrate::wss;
use ferry_migrate::{Applied, ControlError, Fault, SnapshotRequest, VmController};
use serde_json::json;

use crate::http::{read_request, write_response, Request, Response};

/// Most API connections served at once; more get 503 at once instead of a
/// thread each (3,000 idle connections once made 3,004 threads).
pub const MAX_CONNECTIONS: usize = 64;

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
    active: Arc<AtomicUsize>,
}

impl ApiServer {
    /// Waits up to `timeout` for connections being served to finish, so a
    /// client whose request was in flight when the VM stopped gets its answer.
    pub fn drain(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
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
    Ok((l, ApiServer { path: path.to_path_buf(), active: Arc::new(AtomicUsize::new(0)) }))
}

/// Counts a connection as active until dropped.
struct Active(Arc<AtomicUsize>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the API serves: a VM, or, on a `ferry receive` still waiting for
/// its VM, a note saying so.
pub struct Target {
    ctl: OnceLock<Arc<VmController>>,
    incoming: String,
    /// The incoming migration's phase (`commit-unconfirmed` while a VM
    /// whose `Go` did not arrive waits for a settle).
    progress: IncomingHandle,
}

impl Target {
    /// A target that serves `ctl` from the start.
    pub fn vm(ctl: Arc<VmController>) -> Arc<Target> {
        let t = Target { ctl: OnceLock::new(), incoming: String::new(), progress: IncomingHandle::default() };
        let _ = t.ctl.set(ctl);
        Arc::new(t)
    }

    /// A target waiting for an incoming migration on `listen`, whose phase
    /// `progress` tells.
    pub fn incoming(listen: String, progress: IncomingHandle) -> Arc<Target> {
        Arc::new(Target { ctl: OnceLock::new(), incoming: listen, progress })
    }

    /// Starts serving the VM that arrived.
    pub fn set(&self, ctl: Arc<VmController>) {
        let _ = self.ctl.set(ctl);
    }

    /// The VM, once there is one.
    pub fn controller(&self) -> Option<&Arc<VmController>> {
        self.ctl.get()
    }
}

/// Answers while a `ferry receive` waits for its VM: `GET /vm` says
/// `incoming`, every other endpoint 409.
fn route_incoming(t: &Target, req: &Request) -> Response {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/vm") => {
            let migration = t.progress.lock().unwrap().clone();
            Response::json(200, &json!({ "state": "incoming", "listen": t.incoming, "migration": migration }))
        }
        (_, p) if ENDPOINTS.iter().any(|(e, _)| *e == p) || crate::liveapi::serves(p) => Response::error(
            409,
            format!("VM is incoming: waiting for a migration on {}; {p} is served once it arrives", t.incoming),
        ),
        (_, p) => Response::error(404, format!("no such endpoint {p}")),
    }
}

/// Serves requests until the process ends: a thread per connection, at
/// most [`MAX_CONNECTIONS`] at once.
pub fn serve(listener: UnixListener, server: &ApiServer, target: Arc<Target>) {
    let active = server.active.clone();
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut stream) = conn else { continue };
                if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    let guard = Active(active.clone());
                    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
                    let r = Response::error(503, format!("too many API connections (limit {MAX_CONNECTIONS}); retry"));
                    let _ = write_response(&mut stream, &r);
                    let _ = stream.flush();
                    drop(guard);
                    continue;
                }
                let guard = Active(active.clone());
                let target = target.clone();
                let spawned = std::thread::Builder::new().name("api-conn".into()).spawn(move || {
                    let _guard = guard;
                    let resp = match read_request(&mut stream) {
                        Ok(req) => match target.controller() {
                            Some(ctl) => route(ctl, &req),
                            None => route_incoming(&target, &req),
                        },
                        Err(resp) => resp,
                    };
                    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
                    let _ = write_response(&mut stream, &resp);
                });
                // On failure the closure (and its guard) is dropped: the count stays right.
                drop(spawned);
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

/// Maps a controller error to its status: 400 for the client's mistakes,
/// 409 for a VM that cannot do it now (with the operation that holds it),
/// 500 for the VMM's own failures.
pub(crate) fn control_error(e: ControlError) -> Response {
    let status = match e.fault() {
        Fault::Client => 400,
        Fault::Conflict => 409,
        Fault::Vmm => 500,
        Fault::Peer => 502,
    };
    let mut body = json!({ "error": e.to_string(), "status": status });
    if let Some(op) = e.running() {
        body["operation"] = json!(op);
    }
    Response::json(status, &body)
}

/// Maps a sampler error to its status: 400 bad request, 409 busy or stopped, 500 the VMM's.
fn wss_error(e: wss::WssError) -> Response {
    let status = match e {
        wss::WssError::Invalid(_) => 400,
        wss::WssError::Busy { .. } | wss::WssError::Stopped => 409,
        wss::WssError::Vm(_) | wss::WssError::Thread(_) => 500,
    };
    Response::error(status, e.to_string())
}

/// The endpoints and the methods each allows.
const ENDPOINTS: &[(&str, &str)] = &[
    ("/vm", "GET"),
    ("/vm/pause", "PUT"),
    ("/vm/resume", "PUT"),
    ("/vm/shutdown", "PUT"),
    ("/vm/memory-digest", "GET"),
    ("/vm/console", "PUT"),
    ("/vm/snapshot", "PUT"),
    ("/vm/migrate", "PUT"),
    ("/vm/migration", "GET"),
    ("/vm/migration/cancel", "PUT"),
    ("/vm/migration/resume", "PUT"),
    ("/vm/migration/take-back", "PUT"),
    ("/vm/wss", "GET, PUT"),
];

fn run_state_response(ctl: &VmController, applied: Applied, requested: &str) -> Response {
    match applied {
        Applied::Now => Response::json(200, &json!({ "state": requested })),
        Applied::Deferred { until } => Response::json(
            202,
            &json!({
                "state": ctl.vm().status().state,
                "requested_state": requested,
                "applies_after": until,
            }),
        ),
    }
}

/// Dispatches one request.
pub fn route(ctl: &Arc<VmController>, req: &Request) -> Response {
    let vm = ctl.vm();
    let m = req.method.as_str();
    match (m, req.path.as_str()) {
        ("GET", "/vm") => {
            let mut v = serde_json::to_value(vm.status()).unwrap_or_default();
            v["boot_times"] = serde_json::to_value(vm.boot_times()).unwrap_or_default();
            let c = ctl.status();
            v["operation"] = serde_json::to_value(&c.operation).unwrap_or_default();
            v["requested_state"] = json!(c.requested_state);
            v["shutting_down"] = json!(c.shutting_down);
            Response::json(200, &v)
        }
        ("PUT", "/vm/pause") => match body_json(req) {
            Err(r) => r,
            Ok(_) => match ctl.pause() {
                Ok(a) => run_state_response(ctl, a, "paused"),
                Err(e) => control_error(e),
            },
        },
        ("PUT", "/vm/resume") => match body_json(req) {
            Err(r) => r,
            Ok(_) => match ctl.resume() {
                Ok(a) => run_state_response(ctl, a, "running"),
                Err(e) => control_error(e),
            },
        },
        ("PUT", "/vm/shutdown") => {
            let body = match body_json(req) {
                Ok(b) => b,
                Err(r) => return r,
            };
            if let Some(k) = body.as_object().and_then(|o| o.keys().find(|k| *k != "timeout_ms")) {
                return Response::error(400, format!("unknown field {k:?}; the only field is timeout_ms"));
            }
            let timeout_ms = match body.get("timeout_ms") {
                None => 10_000,
                Some(v) => match v.as_u64() {
                    Some(t) if t <= 3_600_000 => t,
                    _ => return Response::error(400, "timeout_ms must be an integer from 0 to 3600000 (milliseconds)"),
                },
            };
            match ctl.shutdown(Duration::from_millis(timeout_ms)) {
                Ok(()) => Response::json(202, &json!({ "state": "shutting_down", "timeout_ms": timeout_ms })),
                Err(e) => control_error(e),
            }
        }
        ("GET", "/vm/memory-digest") => match ctl.memory_digest() {
            Ok(d) => Response::json(200, &d),
            Err(e) => control_error(e),
        },
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
            match ctl.snapshot(&req) {
                Ok(v) => Response::json(200, &v),
                Err(e) => control_error(e),
            }
        }
        ("PUT", "/vm/migrate") => {
            let req: MigrateRequest = match serde_json::from_slice(&req.body) {
                Ok(r) => r,
                Err(e) => return Response::error(400, format!("invalid migrate request: {e}")),
            };
            match ctl.migrate(&req) {
                Ok(v) => Response::json(200, &v),
                Err(e) => control_error(e),
            }
        }
        ("GET", "/vm/migration") => Response::json(200, &ctl.migration_progress()),
        ("PUT", "/vm/migration/cancel") => match body_json(req).map(|_| ctl.cancel_migration()) {
            Err(r) => r,
            Ok(Ok(())) => Response::json(202, &json!({ "state": "cancelling" })),
            Ok(Err(e)) => control_error(e),
        },
        ("PUT", "/vm/migration/resume") => match body_json(req).map(|_| ctl.resume_migration()) {
            Err(r) => r,
            Ok(Ok(v)) => Response::json(200, &v),
            Ok(Err(e)) => control_error(e),
        },
        ("PUT", "/vm/migration/take-back") => {
            let body = match body_json(req) {
                Ok(b) => b,
                Err(r) => return r,
            };
            if let Some(k) = body.as_object().and_then(|o| o.keys().find(|k| *k != "force")) {
                return Response::error(400, format!("unknown field {k:?}; the only field is force"));
            }
            let force = match body.get("force") {
                None => false,
                Some(v) => match v.as_bool() {
                    Some(f) => f,
                    None => return Response::error(400, "force must be true or false"),
                },
            };
            match ctl.take_back_migration(force) {
                Ok(v) => Response::json(200, &v),
                Err(e) => control_error(e),
            }
        }
        ("PUT", "/vm/wss") => {
            let req: wss::WssRequest = match serde_json::from_slice(&req.body) {
                Ok(r) => r,
                Err(e) => return Response::error(400, format!("invalid working-set request: {e}")),
            };
            match wss::start(vm, &req) {
                Ok(v) => Response::json(202, &v),
                Err(e) => wss_error(e),
            }
        }
        ("GET", "/vm/wss") => Response::json(200, &wss::status()),
        (_, p) if crate::liveapi::serves(p) => crate::liveapi::route(ctl, req),
        (_, p) => match ENDPOINTS.iter().find(|(path, _)| *path == p) {
            Some((_, allow)) => {
                let mut r = Response::error(405, format!("method {m} not allowed on {p}; allowed: {allow}"));
                r.allow = Some(allow);
                r
            }
            None => Response::error(404, format!("no such endpoint {p}")),
        },
    }
}
