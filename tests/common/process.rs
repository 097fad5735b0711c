//! A real `swapd serve` process on a free loopback port: its stderr is kept for assertions,
//! and it is killed on drop, so a failing test leaves nothing running.
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_swapd");

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
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    /// `swapd serve --device cpu --listen 127.0.0.1:<free port> ARGS`, with `RUST_LOG=info`
    /// unless `envs` sets it; returns once it logs that it is serving.
    pub fn start(args: &[&str], envs: &[(&str, &str)]) -> Self {
        let port = free_port();
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--device", "cpu"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
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
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut served = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        };
        served.wait_for_log("serving", Duration::from_secs(120));
        served
    }

    /// Waits until a log line contains `text` (the text format's `serving` also matches the
    /// JSON format's `"message":"serving"`).
    pub fn wait_for_log(&mut self, text: &str, within: Duration) {
        let t = Instant::now();
        while !self.log.lock().unwrap().iter().any(|l| l.contains(text)) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "swapd exited ({status}) before logging `{text}`:\n{}",
                    self.log_text()
                );
            }
            assert!(
                t.elapsed() < within,
                "no `{text}` in the log within {within:?}:\n{}",
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
