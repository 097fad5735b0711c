//! A real `swapd serve` process on a loopback port it picked itself: its stderr is kept for
//! assertions, and it is killed on drop, so a failing test leaves nothing running.
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_swapd");

/// A port nothing listens on right now. Only for addresses a test wants *unreachable*: a port
/// handed to a server this way can be taken by a parallel test before the server binds it
/// (that race once failed CI), so servers listen on port 0 and report what they bound.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Served {
    pub child: Child,
    pub url: String,
    /// The separate control address's URL, when `--control-listen` was given.
    pub control_url: Option<String>,
    log: Arc<Mutex<Vec<String>>>,
    /// The thread draining stderr; joined once the process exits, so its last lines are in.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    /// `swapd serve --device DEVICE --listen 127.0.0.1:0 ARGS` (DEVICE: `super::test_device`), with `RUST_LOG=info` unless
    /// `envs` sets it; returns once it logs that it is serving, with the URLs of the addresses
    /// it bound (read from that log line).
    pub fn start(args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--device", &super::test_device()])
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        // Keeps draining the log, so the server never blocks on a full pipe.
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut served = Self {
            child,
            url: String::new(),
            control_url: None,
            log,
            reader: Some(reader),
        };
        // The `serving` line (not e.g. `serving the last committed version`) names the address.
        let line = served.wait_for_line("a `serving` line with the bound address", |l| {
            l.contains("serving") && bound_addr(l, "addr").is_some()
        });
        let url = |field: &str| bound_addr(&line, field).map(|a| format!("http://{a}"));
        served.url = url("addr").unwrap();
        served.control_url = url("control");
        served
    }

    /// Waits until a log line contains `text` (the text format's `serving` also matches the
    /// JSON format's `"message":"serving"`).
    pub fn wait_for_log(&mut self, text: &str, within: Duration) {
        self.wait_for_line_within(&format!("`{text}`"), within, |l| l.contains(text));
    }

    fn wait_for_line(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.wait_for_line_within(what, Duration::from_secs(120), pred)
    }

    /// Waits until a log line satisfies `pred` and returns it; panics with the log if the
    /// process exits first or `within` passes.
    fn wait_for_line_within(
        &mut self,
        what: &str,
        within: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let t = Instant::now();
        loop {
            if let Some(line) = self.log.lock().unwrap().iter().find(|l| pred(l)) {
                return line.clone();
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "swapd exited ({status}) before logging {what}:\n{}",
                    self.log_text()
                );
            }
            assert!(
                t.elapsed() < within,
                "no {what} in the log within {within:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Sends `kill -SIG` to the process.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    /// Waits for the process to exit and returns its exit code (`None`: killed by a signal).
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Its last lines may still be in the pipe: read it to EOF first (swapd starts
                // no child processes, so its exit closes the pipe).
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
                return status.code();
            }
            assert!(
                t.elapsed() < within,
                "still running after {within:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The socket address logged as `FIELD=Some(ADDR)` (text) or `"FIELD":"Some(ADDR)"` (JSON).
fn bound_addr(line: &str, field: &str) -> Option<String> {
    [format!("{field}=Some("), format!("\"{field}\":\"Some(")]
        .iter()
        .find_map(|key| {
            let rest = &line[line.find(key.as_str())? + key.len()..];
            Some(rest[..rest.find(')')?].to_string())
        })
}
