//! Man pages, init scripts and the install script are source files: they are linted, they
//! name only flags that exist, their examples are sent to a real server, and the scripts run.

use crate::common;

use common::{TempDir, TestServer};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A man page as text, with roff's escaped hyphens made plain.
fn man_text(path: &str) -> String {
    read(path).replace("\\-", "-")
}

fn help(binary: &str, args: &[&str]) -> String {
    let out = Command::new(binary)
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// Every `--flag` a help text lists (not `--help` itself).
fn flags(help: &str) -> Vec<String> {
    let mut flags: Vec<String> = help
        .split(|c: char| c.is_whitespace() || c == '[' || c == ']')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches(',').to_string())
        .filter(|w| w != "--help")
        .collect();
    flags.sort();
    flags.dedup();
    flags
}

/// `mandoc -T lint` must have nothing to say. CI installs mandoc; elsewhere a missing mandoc
/// skips this check with a note.
#[test]
fn man_pages_are_lint_clean() {
    let probe = Command::new("mandoc").arg("-V").output();
    if probe.is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install mandoc (see .ci/run)"
        );
        eprintln!("mandoc is not installed; skipping the lint");
        return;
    }
    for page in ["man/phpmq-server.1", "man/phpmq.1", "man/phpmq-protocol.7"] {
        let out = Command::new("mandoc")
            .args(["-T", "lint", "-W", "all"])
            .arg(repo(page))
            .output()
            .unwrap();
        let complaints = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && complaints.trim().is_empty(),
            "{page}:\n{complaints}"
        );
    }
}

#[test]
fn every_server_flag_is_in_its_man_page() {
    let man = man_text("man/phpmq-server.1");
    let listed = flags(&help(common::server_binary(), &[]));
    assert!(listed.len() >= 10, "{listed:?}");
    for flag in listed {
        assert!(
            man.contains(&flag),
            "man/phpmq-server.1 does not document {flag}"
        );
    }
}

#[test]
fn every_cli_command_and_flag_is_in_its_man_page() {
    let man = man_text("man/phpmq.1");
    let cli = env!("CARGO_BIN_EXE_phpmq");
    let mut all = flags(&help(cli, &[]));
    for command in ["send", "consume", "status", "flush", "ping", "bench"] {
        assert!(
            man.contains(&format!(".B {command}"))
                || man.contains(&format!(".BI {command}"))
                || man.contains(&format!(".BR {command}")),
            "{command} has an entry"
        );
        all.extend(flags(&help(cli, &[command])));
    }
    for flag in all {
        assert!(man.contains(&flag), "man/phpmq.1 does not document {flag}");
    }
}

/// The frames in phpmq-protocol(7)'s EXAMPLES, in order.
fn protocol_examples() -> Vec<String> {
    let page = read("man/phpmq-protocol.7");
    let examples = page
        .split(".SH EXAMPLES")
        .nth(1)
        .expect("an EXAMPLES section");
    examples
        .split(".EX\n")
        .skip(1)
        .map(|block| block.split("\n.EE").next().unwrap().to_string())
        .collect()
}

#[test]
fn the_protocol_page_examples_work_verbatim() {
    let examples = protocol_examples();
    assert_eq!(examples.len(), 5, "{examples:?}");
    let server = TestServer::start(&[]);
    let mut producer = server.tcp_client();
    producer
        .raw(examples[0].as_bytes())
        .raw(examples[1].as_bytes());
    let mut consumer = server.tcp_client();
    consumer.raw(examples[2].as_bytes());
    let first = consumer.recv();
    assert_eq!(
        (
            first.queue.as_str(),
            first.text().as_str(),
            first.packet_count
        ),
        ("Queue", "Hello World", 3)
    );
    let second = consumer.recv();
    assert_eq!(second.text(), "Hello World");
    assert_eq!(
        second.packet_count, 3,
        "a v1.0 consumer never gets the TTL packet"
    );

    // The dispatch and the ack shown decode as the page says.
    for (example, kind, packets) in [
        (&examples[3], phpmq::codec::MessageType::Dispatch, 3),
        (&examples[4], phpmq::codec::MessageType::Ack, 2),
    ] {
        match phpmq::codec::decode_frame(example.as_bytes(), 1 << 20) {
            Ok(phpmq::codec::Decoded::Frame(frame, used)) => {
                assert_eq!(used, example.len());
                assert_eq!(frame.message_type, kind);
                assert_eq!(&example[6..8], format!("{packets:02}"));
            }
            other => panic!("{example}: {other:?}"),
        }
    }
}

/// The `phpmq-server` arguments a script uses, with its paths moved into `dir` and its ports
/// made ephemeral, so the real command line can be run here.
fn localise(args: &str, dir: &Path) -> Vec<String> {
    let d = dir.display().to_string();
    args.replace("/var/lib/phpmq", &d)
        .replace("/run/phpmq", &d)
        .replace("/var/log/phpmq", &d)
        .replace("127.0.0.1:9100", "127.0.0.1:0")
        .replace("127.0.0.1:9101", "127.0.0.1:0")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn the_systemd_unit_starts_a_real_server() {
    let unit = read("scripts/phpmq.service");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    let (binary, args) = exec.split_once(' ').unwrap();
    assert_eq!(binary, "/usr/local/bin/phpmq-server");
    let known = flags(&help(common::server_binary(), &[]));
    for flag in flags(args) {
        assert!(
            known.contains(&flag),
            "the unit uses {flag}, which phpmq-server does not have"
        );
    }
    for needed in [
        "User=phpmq",
        "StateDirectory=phpmq",
        "KillSignal=SIGTERM",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        assert!(unit.contains(needed), "the unit has {needed}");
    }
    let dir = TempDir::new("unit");
    let args = localise(args, dir.path());
    let server = TestServer::start_with(dir, args);
    let mut client = server.unix_client();
    client.send("unit", b"ok").consume("unit", 1);
    assert_eq!(client.recv().text(), "ok");
}

#[test]
fn the_init_script_starts_reports_and_stops_a_real_server() {
    let script = read("scripts/phpmq.init");
    let default_args = script
        .lines()
        .find_map(|l| l.strip_prefix("DAEMON_ARGS=${DAEMON_ARGS:-\""))
        .expect("a DAEMON_ARGS line");
    let known = flags(&help(common::server_binary(), &[]));
    for flag in flags(default_args) {
        assert!(
            known.contains(&flag),
            "the init script uses {flag}, which phpmq-server does not have"
        );
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    if Command::new("start-stop-daemon")
        .arg("--version")
        .output()
        .is_err()
        || !root
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root with start-stop-daemon"
        );
        eprintln!("needs root and start-stop-daemon; skipping the run");
        return;
    }
    let dir = TempDir::new("init");
    let d = dir.path();
    let admin = free_port();
    let args = format!(
        "--listen unix:{0}/phpmq.sock --admin {admin} --db {0}/phpmq.sqlite --log-file {0}/phpmq.log",
        d.display()
    );
    let run = |action: &str| {
        Command::new("sh")
            .arg(repo("scripts/phpmq.init"))
            .arg(action)
            .env("DAEMON", common::server_binary())
            .env("PHPMQ", env!("CARGO_BIN_EXE_phpmq"))
            .env("RUN_AS", "root")
            .env("STATE_DIR", d)
            .env("RUN_DIR", d)
            .env("LOG_DIR", d)
            .env("PIDFILE", d.join("phpmq.pid"))
            .env("ADMIN", &admin)
            .env("DAEMON_ARGS", &args)
            .env("EXTRA_ARGS", "--max-queue-length 1000")
            .output()
            .unwrap()
    };
    // A failed assertion below must not leave the server running.
    struct StopAtEnd<F: Fn()>(F);
    impl<F: Fn()> Drop for StopAtEnd<F> {
        fn drop(&mut self) {
            (self.0)();
        }
    }
    let _stop_at_end = StopAtEnd(|| drop(run("stop")));
    let out = run("start");
    assert!(
        out.status.success(),
        "start: {out:?}\nlog: {}",
        std::fs::read_to_string(d.join("phpmq.log")).unwrap_or_default()
    );
    let out = run("status");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("is running"),
        "{out:?}"
    );
    let mut client = common::Client::unix(&d.join("phpmq.sock"));
    client.send("init", b"kept").sync();
    drop(client);
    assert!(run("reload").status.success());
    let out = run("stop");
    assert!(out.status.success(), "stop: {out:?}");
    let out = run("status");
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(!d.join("phpmq.sock").exists());
    let log = std::fs::read_to_string(d.join("phpmq.log")).unwrap();
    assert!(log.contains("final mirror: 1 messages"), "{log}");
    assert!(log.contains("reopened log file"), "{log}");

    // A server that cannot start is not waited for, and its log says why.
    std::fs::write(d.join("phpmq.sock"), "not a socket").unwrap();
    let started = std::time::Instant::now();
    let out = run("start");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(8),
        "{out:?}"
    );
    let log = std::fs::read_to_string(d.join("phpmq.log")).unwrap();
    assert!(
        log.contains("cannot start: cannot listen on unix:") && log.contains("not a socket"),
        "{log}"
    );
}

fn free_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

#[test]
fn the_install_script_stages_everything() {
    let bin_dir = Path::new(common::server_binary())
        .parent()
        .unwrap()
        .to_path_buf();
    for (flag, service_file) in [
        ("", "etc/systemd/system/phpmq.service"),
        ("--sysv", "etc/init.d/phpmq"),
    ] {
        let dest = TempDir::new("install");
        let mut command = Command::new("bash");
        command
            .arg(repo("scripts/install.sh"))
            .args(["--no-build", "--no-user"]);
        if !flag.is_empty() {
            command.arg(flag);
        }
        let out = command
            .env("DESTDIR", dest.path())
            .env("PREFIX", "/usr")
            .env("BIN_DIR", &bin_dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        for file in [
            "usr/bin/phpmq-server",
            "usr/bin/phpmq",
            "usr/share/man/man1/phpmq-server.1",
            "usr/share/man/man1/phpmq.1",
            "usr/share/man/man7/phpmq-protocol.7",
            service_file,
        ] {
            assert!(dest.path().join(file).exists(), "{file} installed");
        }
        let service = std::fs::read_to_string(dest.path().join(service_file)).unwrap();
        assert!(
            service.contains("/usr/bin/phpmq-server") && !service.contains("/usr/local/bin"),
            "paths follow PREFIX"
        );
        let version = Command::new(dest.path().join("usr/bin/phpmq-server"))
            .arg("--version")
            .output()
            .unwrap();
        assert!(version.status.success());
    }
}

/// The frames of phpmq-protocol(7)'s v1.2 section: every line of its examples that is a frame.
fn v12_frames() -> Vec<String> {
    let page = read("man/phpmq-protocol.7");
    let section = page
        .split(".SH PHPMQ v1.2")
        .nth(1)
        .and_then(|rest| rest.split(".SH EXAMPLES").next())
        .expect("a PHPMQ v1.2 section before EXAMPLES");
    section
        .split(".EX\n")
        .skip(1)
        .filter_map(|block| block.split("\n.EE").next())
        .flat_map(|block| block.lines())
        .filter(|line| line.starts_with("H01"))
        .map(str::to_string)
        .collect()
}

/// Every v1.2 frame the page shows is one whole, valid frame as a v1.2 connection reads it,
/// and the requests among them are valid v1.2 requests.
#[test]
fn the_protocol_page_v12_frames_decode_byte_for_byte() {
    use phpmq::codec::{decode_frame_in, Decoded, Dialect};
    use phpmq::request::Request;
    let frames = v12_frames();
    assert!(frames.len() >= 15, "{frames:?}");
    for frame in &frames {
        match decode_frame_in(frame.as_bytes(), 1 << 20, Dialect::V12) {
            Ok(Decoded::Frame(decoded, used)) => {
                assert_eq!(used, frame.len(), "{frame}");
                if decoded.message_type.is_from_client() {
                    let request = Request::from_frame(&decoded, Dialect::V12);
                    assert!(request.is_ok(), "{frame}: {request:?}");
                }
            }
            other => panic!("{frame}: {other:?}"),
        }
    }
}

/// The `printf … | nc` line of the v1.2 section sends exactly a HELLO for 1.2, a send with a
/// delay and a STATS, and the WELCOME shown is the one a server without dead-letter or
/// durable receipts sends.
#[test]
fn the_protocol_page_v12_nc_example_sends_what_it_says() {
    use phpmq::codec::{decode_frame_in, Decoded, Dialect};
    use phpmq::hello::{Features, Version};
    use phpmq::outgoing::Outgoing;
    use phpmq::request::Request;
    let page = read("man/phpmq-protocol.7");
    let line = page
        .lines()
        .find(|l| l.starts_with("(printf '%s' "))
        .expect("a printf line");
    let quoted: Vec<&str> = line.split('\'').skip(3).step_by(2).collect();
    let bytes = quoted.concat();
    let mut rest = bytes.as_bytes();
    let mut requests = Vec::new();
    while !rest.is_empty() {
        match decode_frame_in(rest, 1 << 20, Dialect::V12) {
            Ok(Decoded::Frame(frame, used)) => {
                requests.push(Request::from_frame(&frame, Dialect::V12).unwrap());
                rest = &rest[used..];
            }
            other => panic!("{line}: {other:?}"),
        }
    }
    assert!(matches!(
        requests.as_slice(),
        [
            Request::Hello {
                version: Version::V1_2,
                token: None,
                ..
            },
            Request::Send {
                delay: Some(5000),
                ..
            },
            Request::Stats { .. }
        ]
    ));
    assert!(
        line.ends_with("; sleep 1) | nc \\-N 127.0.0.1 9100"),
        "{line}"
    );
    let mut welcome = Vec::new();
    // A default server keeps a file: durable, and no dead letters.
    Outgoing::Welcome {
        version: Version::V1_2,
        features: Features::served(false, true),
    }
    .encode(&mut welcome, Dialect::V12);
    let welcome = String::from_utf8(welcome).unwrap();
    assert!(v12_frames().contains(&welcome), "the page shows {welcome}");
}
