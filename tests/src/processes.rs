//! Starting the real binaries as child processes, with their logs in the test's folder.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The folder cargo put the workspace binaries in: the test executable lives in its `deps/`.
fn binary_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    let deps = exe.parent().expect("test executables live in a folder");
    if deps.ends_with("deps") {
        deps.parent().expect("deps has a parent").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// Path of a workspace binary; `scripts/test.sh` builds them all before running the tests.
pub fn binary(name: &str) -> Result<PathBuf> {
    let path = binary_dir().join(name);
    if !path.exists() {
        bail!(
            "binary {} not built: run `cargo build --workspace --bins` first (scripts/test.sh does)",
            path.display()
        );
    }
    Ok(path)
}

/// A running child process that is killed when dropped.
pub struct Process {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Process {
    /// Starts `binary args...` with its stdout and stderr in `{dir}/{name}.log` (appended, so a
    /// restarted process keeps its predecessor's log).
    pub fn start(
        name: &str,
        binary: &Path,
        args: &[&str],
        dir: &Path,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::start_in(name, binary, args, dir, None, env)
    }

    /// [`Process::start`], run from `working_dir` (where relative paths in its configuration
    /// point) instead of the test's own.
    pub fn start_in(
        name: &str,
        binary: &Path,
        args: &[&str],
        dir: &Path,
        working_dir: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut command = Command::new(binary);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .env("RUST_LOG", "info,lapin=warn,sqlx=warn,aws=warn");
        for (key, value) in env {
            command.env(key, value);
        }
        if let Some(working_dir) = working_dir {
            command.current_dir(working_dir);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the process gets no chance to clean up, as in a crash or an OOM kill.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Sends the signal of that name (`TERM`, `STOP`, `CONT`) with kill(1).
    pub fn signal(&self, signal: &str) -> Result<()> {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()?;
        if !status.success() {
            bail!(
                "kill -{signal} {} ({}) failed: {status}",
                self.pid(),
                self.name
            );
        }
        Ok(())
    }

    /// How it exited, once it has.
    pub fn exit_status(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// SIGTERM, then waits up to `patience` for a graceful exit (at once if it already
    /// exited).
    pub fn terminate(&mut self, patience: Duration) -> Result<std::process::ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        self.signal("TERM")?;
        let deadline = Instant::now() + patience;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill()?;
        bail!("{} did not stop within {patience:?} of SIGTERM", self.name)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the admin CLI to its end, whatever its exit status.
pub fn cli_output(config: &Path, args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(binary("syncd")?)
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .output()?)
}

/// Runs the admin CLI and returns its stdout; fails with its stderr if it exits non-zero.
pub fn cli(config: &Path, args: &[&str]) -> Result<String> {
    let output = cli_output(config, args)?;
    if !output.status.success() {
        bail!(
            "syncd {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

/// Polls `check` until it returns `Some` or `timeout` passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An address on the loopback that nothing listens on now, for a process to serve on.
pub fn free_address() -> Result<String> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(probe.local_addr()?.to_string())
}

/// `GET path` on `address`, with a bearer token or none; returns the status code and the whole
/// answer.
pub async fn http_get(address: &str, path: &str, token: Option<&str>) -> Result<(u16, String)> {
    http_request(address, "GET", path, token).await
}

/// `METHOD path` on `address` with an empty body, with a bearer token or none; returns the status
/// code and the whole answer (read as text: for pages and JSON, not images).
pub async fn http_request(
    address: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    let authorization = token
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    stream
        .write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: {address}\r\n{authorization}\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP answer: {answer}"))?;
    Ok((status, answer))
}
