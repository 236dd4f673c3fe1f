//! Persistence and lifecycle against the real binary: mirrors, recovery, refusing bad files,
//! graceful shutdown by signal, log reopening.

use crate::common;

use common::{run_to_exit, Client, Dispatch, TempDir, TestServer, DEADLINE};
use phpmq::codec::{self, MessageType, PacketType};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

fn texts(dispatches: &[Dispatch]) -> Vec<String> {
    dispatches.iter().map(Dispatch::text).collect()
}

/// Consumes `n` messages of `queue` without acknowledging them.
fn take(client: &mut Client, queue: &str, n: usize) -> Vec<Dispatch> {
    client.consume(queue, n as u64 + 1);
    let got: Vec<Dispatch> = (0..n).map(|_| client.recv()).collect();
    assert!(
        client.sync().is_empty(),
        "more than {n} messages in {queue}"
    );
    got
}

/// Waits for a mirror that started after this call, so it holds everything accepted before.
/// (The first mirror to finish may have started earlier; the second cannot have.) Mirrors run
/// only when something changed, so `client` keeps adding a message to a queue of its own
/// meanwhile: a sync's barrier is sent and acknowledged within one batch of the store, and
/// never reaches the file.
fn wait_for_a_fresh_mirror(server: &TestServer, client: &mut Client) {
    let mirrors = |log: &str| log.lines().filter(|l| l.contains("] mirrored ")).count();
    let before = mirrors(&server.log.text());
    common::wait_until("two more mirrors", || {
        client.send("mirror-nudge", b"");
        client.sync();
        mirrors(&server.log.text()) >= before + 2
    });
}

/// Everything ready in `queue`, acknowledged, in delivery order.
fn drain(client: &mut Client, queue: &str) -> Vec<Dispatch> {
    client.consume(queue, 1000);
    let mut all = Vec::new();
    loop {
        let got = client.sync();
        if got.is_empty() {
            return all;
        }
        for d in &got {
            client.ack(queue, &d.id);
        }
        all.extend(got);
    }
}

/// The write-ahead log gets its room (16 MiB of zeros, for syncs that write over blocks) as the
/// server starts, not only on an idle tick: with a mirror every 10 minutes there is none here.
#[test]
fn the_log_has_its_room_from_the_start() {
    let server = TestServer::start(&["--mirror-interval", "600000"]);
    let mut wal = server.db_path().into_os_string();
    wal.push("-wal");
    common::wait_until("the log's room", || {
        std::fs::metadata(&wal).is_ok_and(|m| m.len() >= 16 << 20)
    });
    // And the log is usable: what a client sends is taken and delivered.
    let mut client = server.tcp_client();
    client.send("q", b"after the room");
    client.consume("q", 1);
    let got = client.sync();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].content, b"after the room");
}

#[test]
fn a_backlog_beyond_the_memory_window_comes_back_in_order_across_a_restart() {
    // More than a queue keeps in memory (65,536 messages or 64 MiB): the later ones are read
    // back from the store as their turn nears, before and after the restart.
    let body = |i: usize| format!("{i:0>100}");
    let mut server = TestServer::start(&[]);
    let mut producer = server.tcp_client();
    for i in 0..100_000 {
        producer.send("deep", body(i).as_bytes());
    }
    producer.sync();
    let mut consumer = server.unix_client();
    consumer.consume("deep", 64);
    for i in 0..25_000 {
        let d = consumer.recv();
        assert_eq!(d.text(), body(i), "message {i}");
        consumer.ack("deep", &d.id);
    }
    // What it holds unacknowledged goes back to the front of the queue.
    drop(consumer);
    server.signal("TERM");
    server.wait_exit();

    let server = server.restart();
    assert!(server.recovered() >= 75_000);
    let mut consumer = server.tcp_client();
    consumer.consume("deep", 64);
    for i in 25_000..100_000 {
        let d = consumer.recv();
        assert_eq!(d.text(), body(i), "message {i} after the restart");
        consumer.ack("deep", &d.id);
    }
    assert!(consumer.sync().is_empty(), "nothing more");
}

#[test]
fn sigkill_after_a_mirror_loses_nothing() {
    let mut server = TestServer::start(&["--mirror-interval", "50", "--log-level", "debug"]);
    let mut producer = server.tcp_client();
    for i in 0..2000 {
        producer.send(
            if i % 2 == 0 { "even" } else { "odd" },
            format!("m{i}").as_bytes(),
        );
    }
    producer.sync();
    let mut looker = server.tcp_client();
    let before = [
        take(&mut looker, "even", 1000),
        take(&mut looker, "odd", 1000),
    ];
    wait_for_a_fresh_mirror(&server, &mut looker);
    server.signal("KILL");
    server.wait_exit();

    let server = server.restart();
    // The helpers' sync() barrier messages may be in the mirror too; the queues below are exact.
    assert!(server.recovered() >= 2000);
    let mut consumer = server.unix_client();
    let after = [
        take(&mut consumer, "even", 1000),
        take(&mut consumer, "odd", 1000),
    ];
    assert_eq!(after, before, "same messages, same order, same ids");
}

#[test]
fn sigterm_right_after_connecting_loses_nothing() {
    // The last clients connect just before the signal: their connections may still wait to be
    // accepted, or have just been, when the server begins to stop. Each is read all the same.
    let mut server = TestServer::start(&[]);
    let mut clients = Vec::new();
    for c in 0..8 {
        let mut client = server.tcp_client();
        for i in 0..250 {
            client.send(&format!("late-{c}"), format!("{i}").as_bytes());
        }
        clients.push(client);
    }
    server.signal("TERM");
    let status = server.wait_exit();
    assert!(status.success(), "{status:?}\n{}", server.log.text());
    drop(clients);

    let server = server.restart();
    assert_eq!(server.recovered(), 2000, "{}", server.log.text());
    let mut consumer = server.tcp_client();
    let expected: Vec<String> = (0..250).map(|i| i.to_string()).collect();
    for c in 0..8 {
        let got = take(&mut consumer, &format!("late-{c}"), 250);
        assert_eq!(texts(&got), expected);
    }
}

/// A second server started on `server`'s database file exits 1, naming the first one's pid.
fn assert_a_second_server_is_refused(server: &TestServer) {
    let db = server.db_path();
    let other = TempDir::new("second");
    let (status, stderr) = run_to_exit(
        &["--listen", "127.0.0.1:0", "--db", db.to_str().unwrap()],
        other.path(),
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    let expected = format!(
        "{}: in use by another phpmq-server (pid {})",
        db.display(),
        server.pid()
    );
    assert!(stderr.contains(&expected), "{stderr}");
}

#[test]
fn a_second_server_on_the_same_file_is_refused_and_the_first_loses_nothing() {
    let mut server = TestServer::start(&[]);
    let mut producer = server.tcp_client();
    for i in 0..3 {
        producer.send("jobs", format!("first-{i}").as_bytes());
    }
    producer.sync();

    assert_a_second_server_is_refused(&server);

    // The refused start touched nothing: the first server goes on and keeps every message.
    producer.send("jobs", b"first-3");
    producer.sync();
    server.signal("TERM");
    let status = server.wait_exit();
    assert!(status.success(), "{status:?}\n{}", server.log.text());
    let server = server.restart();
    assert_eq!(server.recovered(), 4, "{}", server.log.text());
    let mut consumer = server.tcp_client();
    let got = take(&mut consumer, "jobs", 4);
    assert_eq!(texts(&got), ["first-0", "first-1", "first-2", "first-3"]);
}

/// A run that ends without its final mirror (SIGKILL here) is told at the next start, which
/// cannot know what the file lacks; a run that stopped gracefully is not.
#[test]
fn the_next_start_tells_of_a_run_that_did_not_stop_cleanly() {
    const WARNING: &str = "did not finish its stop";
    let server = TestServer::start(&[]);
    let killed = server.pid();
    let mut producer = server.tcp_client();
    producer.send("jobs", b"one");
    producer.sync();
    drop(producer);
    let mut server = server.restart();
    let warning = server.log.wait_for("the warning", |l| l.contains(WARNING));
    assert!(warning.contains(&format!("(pid {killed})")), "{warning}");
    server.recovered();
    server.signal("TERM");
    assert!(server.wait_exit().success(), "{}", server.log.text());
    let server = server.restart();
    server.recovered();
    assert!(
        !server.log.text().contains(WARNING),
        "{}",
        server.log.text()
    );
}

/// A lock file deleted while the server runs (a cleanup script, say) is taken again on the
/// next mirror, so a second server is still refused.
#[test]
fn a_deleted_lock_file_is_taken_again_before_a_second_server_can_start() {
    let server = TestServer::start(&["--mirror-interval", "50"]);
    let lock = server.dir.path().join("phpmq.sqlite.lock");
    std::fs::remove_file(&lock).unwrap();
    server.log.wait_for("the lock taken again", |l| {
        l.contains("phpmq.sqlite.lock was deleted while the server ran; locked it again")
    });
    assert_a_second_server_is_refused(&server);
}

/// Another phpmq file copied over the live one in place (same inode: `cp backup.sqlite
/// phpmq.sqlite` while the server runs) is noticed and the file written again in full, so a
/// crash after it loses nothing and leaves no corrupt file.
#[test]
fn a_file_written_over_in_place_is_written_again_in_full() {
    let mut other = TestServer::start(&[]);
    let mut producer = other.tcp_client();
    producer.send("elsewhere", b"not ours");
    producer.sync();
    other.signal("TERM");
    assert!(other.wait_exit().success());
    let backup = other.db_path();

    let server = TestServer::start(&["--mirror-interval", "50", "--log-level", "debug"]);
    let mut client = server.tcp_client();
    for i in 0..1000 {
        client.send("jobs", format!("{i}").as_bytes());
    }
    wait_for_a_fresh_mirror(&server, &mut client);
    std::fs::copy(&backup, server.db_path()).unwrap();
    for i in 1000..2000 {
        client.send("jobs", format!("{i}").as_bytes());
    }
    server.log.wait_for("the overwrite noticed", |l| {
        l.contains("written by another program while the server ran; writing it again in full")
    });
    wait_for_a_fresh_mirror(&server, &mut client);

    let server = server.restart(); // SIGKILL, then the same file
    let mut consumer = server.tcp_client();
    let got = take(&mut consumer, "jobs", 2000);
    let expected: Vec<String> = (0..2000).map(|i| i.to_string()).collect();
    assert_eq!(texts(&got), expected);
    consumer.consume("elsewhere", 1);
    assert!(consumer.sync().is_empty(), "nothing of the other file");
}

#[test]
fn sigterm_right_after_sending_loses_nothing() {
    let mut server = TestServer::start(&[]);
    let mut producer = server.tcp_client();
    for i in 0..5000 {
        producer.send("quick", format!("{i}").as_bytes());
    }
    // No sync: the server may not even have read these yet.
    server.signal("TERM");
    let status = server.wait_exit();
    assert!(status.success(), "{status:?}\n{}", server.log.text());

    let server = server.restart();
    assert_eq!(server.recovered(), 5000);
    let mut consumer = server.tcp_client();
    let got = take(&mut consumer, "quick", 5000);
    let expected: Vec<String> = (0..5000).map(|i| i.to_string()).collect();
    assert_eq!(texts(&got), expected);
}

#[test]
fn acked_messages_stay_gone_and_held_ones_come_back() {
    let mut server = TestServer::start(&[]);
    let mut producer = server.tcp_client();
    for i in 0..10 {
        producer.send("jobs", format!("{i}").as_bytes());
    }
    let mut consumer = server.tcp_client();
    consumer.consume("jobs", 5);
    let first: Vec<Dispatch> = (0..5).map(|_| consumer.recv()).collect();
    for d in &first[..3] {
        consumer.ack("jobs", &d.id);
    }
    assert_eq!(texts(&consumer.sync()), ["5", "6", "7"]);
    server.signal("TERM");
    assert!(server.wait_exit().success());

    let server = server.restart();
    assert_eq!(server.recovered(), 7);
    let mut again = server.tcp_client();
    let got = take(&mut again, "jobs", 7);
    assert_eq!(texts(&got), ["3", "4", "5", "6", "7", "8", "9"]);
    assert_eq!(got[0].id, first[3].id);
}

#[test]
fn remaining_ttl_survives_a_restart() {
    let mut server = TestServer::start(&[]);
    let mut producer = server.tcp_client();
    producer
        .send_ttl("ttl", b"lasting", 3600)
        .send_ttl("ttl", b"brief", 1);
    producer.send("ttl", b"forever");
    producer.sync();
    let sent = Instant::now();
    server.signal("TERM");
    assert!(server.wait_exit().success());
    common::wait_until("the 1 s ttl to run out", || {
        sent.elapsed() > Duration::from_millis(1100)
    });

    let server = server.restart();
    let mut consumer = server.tcp_client();
    consumer.dead_letter("ttl", "00000000000000000000000000000000"); // shows v1.1
    let got = take(&mut consumer, "ttl", 2);
    assert_eq!(
        texts(&got),
        ["lasting", "forever"],
        "the expired message is gone"
    );
    let ttl = got[0].ttl.expect("remaining ttl");
    assert!((3590..=3600).contains(&ttl), "{ttl}");
    assert_eq!(got[1].ttl, None);
}

/// A frame with packets given as text, for numbers a `u64` cannot carry.
fn frame(t: MessageType, packets: &[(PacketType, &str)]) -> Vec<u8> {
    let packets: Vec<(PacketType, &[u8])> =
        packets.iter().map(|(p, v)| (*p, v.as_bytes())).collect();
    let mut out = Vec::new();
    codec::encode_frame(&mut out, t, &packets);
    out
}

/// The remaining TTL of each message of `queue`, taken (not acknowledged) by a fresh v1.1
/// consumer that asks with a count far beyond u64.
fn huge_ttls_seen(server: &TestServer, queue: &str, n: usize) -> Vec<(String, u64)> {
    let mut consumer = server.tcp_client();
    consumer.dead_letter(queue, "00000000000000000000000000000000"); // shows v1.1
    consumer.raw(&frame(
        MessageType::Consume,
        &[
            (PacketType::Queue, queue),
            (PacketType::Count, &"9".repeat(30)),
        ],
    ));
    let got: Vec<(String, u64)> = (0..n)
        .map(|_| {
            let d = consumer.recv();
            let ttl = d
                .ttl
                .unwrap_or_else(|| panic!("{} came back without a TTL", d.text()));
            (d.text(), ttl)
        })
        .collect();
    assert!(consumer.sync().is_empty(), "more than {n} messages");
    got
}

#[test]
fn huge_ttls_are_clamped_the_same_before_and_after_a_restart() {
    // 10^16 s overflowed the store's i64 milliseconds; 10^20 does not fit a u64; 40 digits.
    let ttls = [
        "10000000000000000",
        "100000000000000000000",
        &"7".repeat(40),
    ];
    let mut server = TestServer::start(&["--mirror-interval", "50", "--log-level", "debug"]);
    let mut producer = server.tcp_client();
    for ttl in ttls {
        producer.raw(&frame(
            MessageType::Send,
            &[
                (PacketType::Queue, "far"),
                (PacketType::Content, ttl),
                (PacketType::Ttl, ttl),
            ],
        ));
    }
    producer.sync();
    let before = huge_ttls_seen(&server, "far", ttls.len());
    let started = Instant::now();
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // The documented latest expiry, 9999-12-31T23:59:59.999Z.
    let clamped = 253_402_300_799_999u64.div_ceil(1000) - now_s;
    for (text, ttl) in &before {
        assert!(
            ttl.abs_diff(clamped) <= 2,
            "{text}: {ttl} s, not the latest expiry ({clamped} s from now)"
        );
    }
    let bodies: Vec<&str> = before.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(bodies, ttls, "all taken, in order");

    // Over a SIGTERM restart, then a SIGKILL restart after a mirror, the remaining TTL is the
    // same, less the time that passed.
    server.signal("TERM");
    assert!(server.wait_exit().success());
    let server = server.restart();
    let after_term = huge_ttls_seen(&server, "far", ttls.len());
    let mut looker = server.tcp_client();
    wait_for_a_fresh_mirror(&server, &mut looker);
    server.signal("KILL");
    let server = server.restart();
    let after_kill = huge_ttls_seen(&server, "far", ttls.len());
    let slack = started.elapsed().as_secs() + 2;
    for after in [after_term, after_kill] {
        for ((text, ttl), (again, ttl_again)) in before.iter().zip(&after) {
            assert_eq!(text, again);
            assert!(
                *ttl_again <= *ttl && ttl - ttl_again <= slack,
                "{text}: {ttl} s before the restart, {ttl_again} s after"
            );
        }
    }
}

#[test]
fn a_negative_expiry_written_by_older_builds_reads_as_the_latest_expiry() {
    let (dir, db) = make_database(1);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i128;
    // What an older build stored for a TTL of 10^16 s: a u64 beyond i64::MAX, wrapped.
    let wrapped = (now_ms + 10i128.pow(19) - (1i128 << 64)) as i64;
    assert!(wrapped < 0);
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute("UPDATE messages SET expires_at = ?1", [wrapped])
        .unwrap();
    drop(conn);
    let server =
        TestServer::start_with(dir, vec!["--listen".to_string(), "127.0.0.1:0".to_string()]);
    let got = huge_ttls_seen(&server, "q", 1);
    let clamped = (253_402_300_799_999 - now_ms as u64).div_ceil(1000);
    assert!(
        got[0].1.abs_diff(clamped) <= 2,
        "{} s, not {clamped} s",
        got[0].1
    );
}

/// Makes a valid phpmq database with `n` messages of 1 KiB in `dir`, and returns its path.
fn make_database(n: usize) -> (TempDir, std::path::PathBuf) {
    let mut server = TestServer::start(&[]);
    let mut producer = server.tcp_client();
    let body = vec![b'x'; 1024];
    for _ in 0..n {
        producer.send("q", &body);
    }
    producer.sync();
    server.signal("TERM");
    assert!(server.wait_exit().success());
    let path = server.db_path();
    let dir = TempDir::new("db");
    let copy = dir.path().join("phpmq.sqlite");
    std::fs::copy(&path, &copy).unwrap();
    (dir, copy)
}

/// Starting on `db` fails with one line naming the file and `reason`, and leaves it unchanged.
fn assert_refused(dir: &TempDir, db: &std::path::Path, reason: &str) {
    let before = std::fs::read(db).unwrap();
    let sock = dir.path().join("s.sock");
    let (status, stderr) = run_to_exit(
        &[
            "--db",
            db.to_str().unwrap(),
            "--listen",
            &format!("unix:{}", sock.display()),
        ],
        dir.path(),
    );
    assert!(!status.success(), "started on a bad file");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].contains(&db.display().to_string()),
        "names the file: {stderr}"
    );
    assert!(lines[0].contains(reason), "says {reason:?}: {stderr}");
    assert!(std::fs::read(db).unwrap() == before, "the file was changed");
    assert!(!sock.exists(), "nothing was bound");
}

#[test]
fn refuses_a_corrupt_database_and_leaves_it_alone() {
    let (dir, db) = make_database(3000);
    let mut bytes = std::fs::read(&db).unwrap();
    assert!(bytes.len() > 64 << 10);
    for b in &mut bytes[16384..16384 + 4096] {
        *b = 0xa5;
    }
    std::fs::write(&db, &bytes).unwrap();
    assert_refused(&dir, &db, "corrupt");
}

#[test]
fn refuses_a_database_where_two_messages_share_an_id() {
    let (dir, db) = make_database(50);
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (seq, id): (i64, Vec<u8>) = conn
        .query_row(
            "SELECT seq, id FROM messages ORDER BY seq LIMIT 1 OFFSET 20",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let copy: i64 = conn
        .query_row("SELECT max(seq) + 1 FROM messages", [], |r| r.get(0))
        .unwrap();
    conn.execute(
        "INSERT INTO messages (seq, id, queue, content, accepted_at, expires_at)
         SELECT ?2, id, queue, content, accepted_at, expires_at FROM messages WHERE seq = ?1",
        [seq, copy],
    )
    .unwrap();
    drop(conn);
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    assert_refused(
        &dir,
        &db,
        &format!("corrupt (message id {hex} appears twice, at positions {seq} and {copy})"),
    );
}

#[test]
fn refuses_a_truncated_database() {
    let (dir, db) = make_database(3000);
    let bytes = std::fs::read(&db).unwrap();
    std::fs::write(&db, &bytes[..bytes.len() / 2]).unwrap();
    assert_refused(&dir, &db, "corrupt");
}

#[test]
fn refuses_a_file_that_is_not_sqlite() {
    let dir = TempDir::new("notdb");
    let db = dir.path().join("phpmq.sqlite");
    let junk: Vec<u8> = (0..10_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&db, junk).unwrap();
    assert_refused(&dir, &db, "not an SQLite database");
}

#[test]
fn refuses_a_directory_for_a_database() {
    let dir = TempDir::new("dirdb");
    let db = dir.path().join("phpmq.sqlite");
    std::fs::create_dir(&db).unwrap();
    let (status, stderr) = run_to_exit(
        &["--db", db.to_str().unwrap(), "--listen", "127.0.0.1:0"],
        dir.path(),
    );
    assert_eq!(status.code(), Some(1));
    assert_eq!(
        stderr,
        format!(
            "phpmq-server: cannot use {}: a directory, not a database file\n",
            db.display()
        )
    );
}

#[test]
fn refuses_a_foreign_sqlite_database() {
    let dir = TempDir::new("foreign");
    let db = dir.path().join("phpmq.sqlite");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch("CREATE TABLE accounts (id INTEGER PRIMARY KEY, owner TEXT); INSERT INTO accounts VALUES (1, 'x');")
        .unwrap();
    drop(conn);
    assert_refused(&dir, &db, "not a phpmq one");
}

#[test]
fn refuses_a_database_from_a_newer_phpmq() {
    let (dir, db) = make_database(1);
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch("PRAGMA user_version = 99;").unwrap();
    drop(conn);
    assert_refused(&dir, &db, "newer phpmq (schema version 99");
}

#[test]
fn an_unwritable_location_fails_at_start() {
    let dir = TempDir::new("nowhere");
    let (status, stderr) = run_to_exit(
        &[
            "--db",
            "/nonexistent-phpmq-dir/x.sqlite",
            "--listen",
            "127.0.0.1:0",
        ],
        dir.path(),
    );
    assert!(!status.success());
    assert!(
        stderr.contains("/nonexistent-phpmq-dir/x.sqlite"),
        "{stderr}"
    );
}

#[test]
fn sigkill_during_a_large_mirror_leaves_the_previous_one() {
    // Each round kills the server while a large mirror is being written (its write-ahead log
    // grows or its full copy is being written, its completion is not logged yet); a round
    // that misses the moment is repeated.
    for round in 1..=5 {
        let mut server = TestServer::start(&["--mirror-interval", "200", "--log-level", "debug"]);
        let mut producer = server.tcp_client();
        for i in 0..100u32 {
            producer.send("big", &i.to_be_bytes());
        }
        producer.sync();
        wait_for_a_fresh_mirror(&server, &mut producer);
        // A mirror this large may replay the changes (the log grows) or copy the store (a
        // temporary file is written): either is caught in the act.
        let wal = server.dir.path().join("phpmq.sqlite-wal");
        let temp = server.dir.path().join("phpmq.sqlite.tmp");
        let wal_len = || std::fs::metadata(&wal).map_or(0, |m| m.len());
        let before = wal_len();
        // About 55 MB more: a mirror of it takes long enough to be caught in the act.
        let mut body = vec![b'.'; 512];
        for i in 100..100_100u32 {
            body[..4].copy_from_slice(&i.to_be_bytes());
            producer.send("big", &body);
        }
        producer.sync();
        let deadline = Instant::now() + DEADLINE;
        let caught = loop {
            let done = server.log.text().contains("mirrored 100100 messages");
            if !done && (wal_len() > before + (4 << 20) || temp.exists()) {
                break true;
            }
            if done || Instant::now() > deadline {
                break false;
            }
            thread::sleep(Duration::from_micros(200));
        };
        server.signal("KILL");
        server.wait_exit();

        let server = server.restart();
        let mut consumer = server.tcp_client();
        let recovered = drain(&mut consumer, "big");
        assert!(
            recovered.len() >= 100,
            "at least the first mirror: {}",
            recovered.len()
        );
        for (i, d) in recovered.iter().enumerate() {
            assert_eq!(
                d.content[..4],
                (i as u32).to_be_bytes(),
                "a FIFO prefix of what was sent"
            );
        }
        if caught {
            return;
        }
        eprintln!("round {round}: the mirror finished before the kill; again");
    }
    panic!("never caught a mirror in progress in 5 rounds");
}

#[test]
fn sigterm_with_busy_clients_exits_within_5s_and_loses_nothing() {
    let mut server = TestServer::start(&[]);
    let addr = server.tcp_addr();
    let sock = server.unix.clone().unwrap();
    const PER_PRODUCER: usize = 20_000;
    // Consumers that keep acknowledging as fast as they can.
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let consumers: Vec<_> = (0..2)
        .map(|k| {
            let acked = acked.clone();
            let sock = sock.clone();
            thread::spawn(move || {
                let mut c = if k == 0 {
                    Client::tcp(addr)
                } else {
                    Client::unix(&sock)
                };
                c.consume("busy", 16);
                while let Ok(Some(d)) = c.try_recv() {
                    if c.try_raw(&ack_frame(&d)).is_err() {
                        break;
                    }
                    acked.lock().unwrap().insert(d.text());
                }
            })
        })
        .collect();
    // A producer that never stops sending until the server goes.
    let endless_stop = Arc::new(AtomicBool::new(false));
    let endless = {
        let stop = endless_stop.clone();
        thread::spawn(move || {
            let mut c = Client::tcp(addr);
            let mut frames = Vec::new();
            phpmq::codec::encode_frame(
                &mut frames,
                phpmq::codec::MessageType::Send,
                &[
                    (phpmq::codec::PacketType::Queue, b"endless"),
                    (phpmq::codec::PacketType::Content, b"more"),
                ],
            );
            // Often enough that the connection is never quiet, rarely enough to stay small.
            while !stop.load(Ordering::Relaxed) && c.try_raw(&frames).is_ok() {
                thread::sleep(Duration::from_millis(2));
            }
        })
    };
    // Producers that send a known set and then stop, without waiting for anything.
    let producers: Vec<_> = (0..2)
        .map(|p| {
            thread::spawn(move || {
                let mut c = Client::tcp(addr);
                for i in 0..PER_PRODUCER {
                    c.send("busy", format!("p{p}-{i}").as_bytes());
                }
                c
            })
        })
        .collect();
    let producer_clients: Vec<Client> = producers.into_iter().map(|p| p.join().unwrap()).collect();

    let signalled = Instant::now();
    server.signal("TERM");
    let status = server.wait_exit();
    let took = signalled.elapsed();
    endless_stop.store(true, Ordering::Relaxed);
    assert!(status.success(), "{status:?}\n{}", server.log.text());
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    assert!(!sock.exists(), "socket file removed");
    drop(producer_clients);
    for c in consumers {
        c.join().unwrap();
    }
    endless.join().unwrap();

    let server = server.restart();
    let mut drain = server.tcp_client();
    drain.consume("busy", 256);
    let mut recovered = HashSet::new();
    loop {
        let got = drain.sync();
        if got.is_empty() {
            break;
        }
        for d in got {
            drain.ack("busy", &d.id);
            recovered.insert(d.text());
        }
    }
    let acked = acked.lock().unwrap();
    let missing: Vec<String> = (0..2)
        .flat_map(|p| (0..PER_PRODUCER).map(move |i| format!("p{p}-{i}")))
        .filter(|m| !acked.contains(m) && !recovered.contains(m))
        .collect();
    assert!(
        missing.is_empty(),
        "{} messages lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}

fn ack_frame(d: &Dispatch) -> Vec<u8> {
    let mut out = Vec::new();
    phpmq::codec::encode_frame(
        &mut out,
        phpmq::codec::MessageType::Ack,
        &[
            (phpmq::codec::PacketType::Queue, d.queue.as_bytes()),
            (phpmq::codec::PacketType::MessageId, d.id.as_bytes()),
        ],
    );
    out
}

#[test]
fn a_second_signal_during_shutdown_exits_at_once() {
    let mut server = TestServer::start(&[]);
    let addr = server.tcp_addr();
    // A client that keeps sending holds shutdown in its drain phase for a while.
    let sender = thread::spawn(move || {
        let mut c = Client::tcp(addr);
        let deadline = Instant::now() + DEADLINE;
        let ack = ack_frame(&Dispatch {
            queue: "q".into(),
            content: Vec::new(),
            id: "0".repeat(32),
            ttl: None,
            packet_count: 2,
        });
        while Instant::now() < deadline && c.try_raw(&ack).is_ok() {
            thread::sleep(Duration::from_millis(2));
        }
    });
    server.tcp_client().sync();
    server.signal("TERM");
    server
        .log
        .wait_for("shutdown to begin", |l| l.contains("shutting down"));
    server.signal("TERM");
    let status = server.wait_exit();
    assert_eq!(status.code(), Some(130), "{}", server.log.text());
    sender.join().unwrap();
}

#[test]
fn sighup_reopens_the_log_file() {
    let dir = TempDir::new("logs");
    let log = dir.path().join("phpmq.log");
    let sock = dir.path().join("s.sock");
    let args = vec![
        "--listen".to_string(),
        format!("unix:{}", sock.display()),
        "--log-file".to_string(),
        log.display().to_string(),
    ];
    let server = TestServer::start_with(dir, args);
    common::wait_until("the ready line in the log file", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("ready;")
    });
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).unwrap();
    server.signal("HUP");
    common::wait_until("a new log file", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("reopened log file")
    });
    assert!(std::fs::read_to_string(&rotated)
        .unwrap()
        .contains("ready;"));
}

/// A SIGHUP whose reopen fails (a directory where the log file was) while stderr is a pipe
/// nobody reads any more (a launcher that read the ready line) leaves the server running: the
/// failure went to stderr with `eprintln!`, which panicked, and the signal watcher's end read
/// as a request to stop, with exit status 0.
#[test]
fn a_failed_log_reopen_with_stderr_gone_keeps_the_server_up() {
    use std::io::BufRead;
    let dir = TempDir::new("logs-gone");
    let log = dir.path().join("phpmq.log");
    let sock = dir.path().join("s.sock");
    let args = [
        "--listen".to_string(),
        format!("unix:{}", sock.display()),
        "--admin".to_string(),
        "none".to_string(),
        "--db".to_string(),
        "none".to_string(),
        "--log-file".to_string(),
        log.display().to_string(),
    ];
    let mut child = std::process::Command::new(common::server_binary())
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("ready;") {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "no ready line");
    }
    drop(stderr);
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).unwrap();
    std::fs::create_dir(&log).unwrap();
    let pid = child.id().to_string();
    let signal = |name: &str| {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .unwrap();
        assert!(status.success());
    };
    signal("HUP");
    // Logged to the file still open, after the write to the closed stderr.
    common::wait_until("the failed reopen in the old log", || {
        std::fs::read_to_string(&rotated)
            .unwrap_or_default()
            .contains("cannot reopen log file")
    });
    let mut client = Client::unix(&sock);
    assert_eq!(client.send("q", b"x").consume("q", 1).recv().text(), "x");
    assert!(child.try_wait().unwrap().is_none(), "the server exited");
    signal("TERM");
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn db_none_keeps_messages_in_memory_only() {
    let mut server = TestServer::start(&["--db", "none"]);
    let ready = server.log.wait_for("ready", |l| l.contains("ready;"));
    assert!(ready.contains("db none (memory only)"), "{ready}");
    server.tcp_client().send("q", b"x").sync();
    server.signal("TERM");
    assert!(server.wait_exit().success());
    let files: Vec<_> = std::fs::read_dir(server.dir.path()).unwrap().collect();
    assert!(files.is_empty(), "no file written: {files:?}");
}

/// The number after `"key":` in a JSON document (the first one).
fn json_number(json: &str, key: &str) -> Option<u64> {
    let rest = &json[json.find(&format!("\"{key}\":"))? + key.len() + 3..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The server's resident memory in bytes.
fn rss(server: &TestServer) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// Sends `n` messages of `size` bytes to `queue`, each starting with its number, and waits
/// until the server has taken them all.
fn fill(server: &TestServer, queue: &str, n: u32, size: usize) {
    let mut producer = server.tcp_client();
    let mut body = vec![b'.'; size.max(4)];
    for i in 0..n {
        body[..4].copy_from_slice(&i.to_be_bytes());
        producer.send(queue, &body);
    }
    producer.sync();
}

/// Waits for a mirror report of at least `messages` messages in the debug log.
fn wait_for_mirror_of(server: &TestServer, messages: i64) {
    server.log.wait_for("a mirror of the whole fill", |l| {
        l.split("] mirrored ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse::<i64>().ok())
            .is_some_and(|n| n >= messages)
    });
}

#[test]
fn a_large_store_keeps_mirroring_under_a_trickle_and_a_sigkill_loses_only_the_last_intervals() {
    const INTERVAL: Duration = Duration::from_millis(200);
    const STORED: u32 = 250_000;
    let mut server = TestServer::start(&["--mirror-interval", "200", "--log-level", "debug"]);
    fill(&server, "backlog", STORED, 256);
    wait_for_mirror_of(&server, STORED.into());

    // A trickle of sends, each on its own connection, as `phpmq send` or a PHP request makes
    // them; each is known to be taken once its barrier returns.
    let mut taken_at = Vec::new();
    let trickle_started = Instant::now();
    let mut worst_age = 0;
    for i in 0..150u32 {
        let mut client = server.tcp_client();
        client.send("trickle", format!("t{i}").as_bytes());
        client.sync();
        taken_at.push(Instant::now());
        if i % 25 == 24 {
            let status = server.console_command("status json");
            let age = json_number(&status, "age_ms").expect("a mirror has completed");
            worst_age = worst_age.max(age);
        }
        thread::sleep(Duration::from_millis(10));
    }
    // Mirrors kept completing: none of the status reads found the last one older than a
    // few intervals (on an idle machine, about one).
    assert!(
        worst_age < 5 * INTERVAL.as_millis() as u64,
        "the last mirror was {worst_age} ms old during a trickle of {:?}",
        trickle_started.elapsed()
    );
    server.signal("KILL");
    let killed_at = Instant::now();
    server.wait_exit();

    let server = server.restart();
    assert!(server.recovered() >= STORED as usize);
    let mut consumer = server.tcp_client();
    let recovered: HashSet<String> = drain(&mut consumer, "trickle")
        .iter()
        .map(Dispatch::text)
        .collect();
    let lost: Vec<usize> = taken_at
        .iter()
        .enumerate()
        .filter(|(i, at)| killed_at - **at > 2 * INTERVAL && !recovered.contains(&format!("t{i}")))
        .map(|(i, _)| i)
        .collect();
    assert!(
        lost.is_empty(),
        "lost {} messages taken more than two intervals before the SIGKILL: {lost:?}",
        lost.len()
    );

    // A graceful stop with a large store writes what changed, not the store: well under the
    // promised 5 s.
    fill(&server, "after", 10, 256);
    let mut server = server;
    let signalled = Instant::now();
    server.signal("TERM");
    assert!(server.wait_exit().success(), "{}", server.log.text());
    let took = signalled.elapsed();
    let line = server
        .log
        .wait_for("the final mirror", |l| l.contains("final mirror:"));
    let written: u64 = line
        .split("; ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no bytes written in {line:?}"));
    assert!(
        line.contains("(changes;") && written < 1 << 20,
        "the final mirror wrote more than what changed: {line}"
    );
    assert!(took < Duration::from_secs(5), "the stop took {took:?}");
}

#[test]
fn after_a_drain_the_file_and_memory_shrink() {
    const STORED: u32 = 60_000;
    let server = TestServer::start(&["--mirror-interval", "100", "--log-level", "debug"]);
    let idle = rss(&server);
    fill(&server, "jobs", STORED, 1024);
    wait_for_mirror_of(&server, STORED.into());
    let db = server.db_path();
    // The file and its write-ahead log.
    let on_disk = || {
        ["", "-wal"]
            .iter()
            .map(|suffix| {
                std::fs::metadata(format!("{}{suffix}", db.display())).map_or(0, |m| m.len())
            })
            .sum::<u64>()
    };
    let full_file = on_disk();
    let full_rss = rss(&server);
    assert!(
        full_file > 50 << 20 && full_rss > idle + (50 << 20),
        "file {full_file} B, memory {idle} B idle, {full_rss} B full"
    );

    // Nine in ten acknowledged, the rest stay.
    let mut consumer = server.tcp_client();
    consumer.consume("jobs", 500);
    let mut acked = 0;
    while acked < STORED * 9 / 10 {
        for d in consumer.sync() {
            if acked < STORED * 9 / 10 {
                consumer.ack("jobs", &d.id);
                acked += 1;
            }
        }
    }
    consumer.consume("jobs", 0);
    consumer.sync();
    common::wait_until("the file and memory to follow the live messages", || {
        on_disk() < full_file / 2 && rss(&server) < idle + (full_rss - idle) / 2
    });
}

#[test]
fn a_database_file_deleted_while_running_is_written_again() {
    // Noticed by the mirror on its next tick.
    let server = TestServer::start(&["--mirror-interval", "100", "--log-level", "debug"]);
    fill(&server, "jobs", 100, 16);
    wait_for_mirror_of(&server, 100);
    let db = server.db_path();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    common::wait_until("the file to be written again", || db.exists());
    server.log.wait_for("a warning", |l| {
        l.contains("was deleted, replaced or written by another program")
    });
    let server = server.restart();
    assert_eq!(server.recovered(), 100);

    // Noticed by the final mirror, long before the next tick.
    let mut server = TestServer::start(&["--mirror-interval", "60000"]);
    fill(&server, "jobs", 100, 16);
    let db = server.db_path();
    std::fs::remove_file(&db).unwrap();
    server.signal("TERM");
    assert!(server.wait_exit().success(), "{}", server.log.text());
    assert!(db.exists(), "the stop left no file:\n{}", server.log.text());
    let server = server.restart();
    assert_eq!(server.recovered(), 100);
}

#[test]
fn a_failing_mirror_is_reported_and_a_stop_that_leaves_no_file_fails() {
    let mut server = TestServer::start(&["--mirror-interval", "100", "--log-level", "debug"]);
    fill(&server, "jobs", 10, 16);
    wait_for_mirror_of(&server, 10);
    let db = server.db_path();
    // Something the mirror cannot replace stands where the file was.
    let block = || {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
        }
        std::fs::create_dir(&db).unwrap();
        std::fs::write(db.join("in-the-way"), b"x").unwrap();
    };
    block();
    common::wait_until("the failures to show in status", || {
        let status = server.console_command("status json");
        json_number(&status, "failing_for").is_some_and(|n| n >= 2)
            && status.contains("\"last_error\":\"")
    });
    let text = server.console_command("status");
    assert!(text.contains("mirror failures: "), "{text}");
    // A full copy that fails leaves nothing pending in the journal: status must still say
    // that the file misses everything since the last mirror.
    assert!(
        text.contains("mirror: the file is to be written in full and misses every change"),
        "{text}"
    );
    assert!(server
        .console_command("status json")
        .contains("\"full_copy_due\":true"));

    // Out of the way again: the next mirror completes and says so.
    std::fs::remove_dir_all(&db).unwrap();
    server.log.wait_for("the mirror to recover", |l| {
        l.contains("mirror completed again")
    });
    assert!(db.is_file());
    let status = server.console_command("status json");
    assert_eq!(json_number(&status, "failing_for"), Some(0), "{status}");
    assert!(json_number(&status, "failures").is_some_and(|n| n >= 2));
    assert!(status.contains("\"full_copy_due\":false"), "{status}");

    block();
    server.signal("TERM");
    let status = server.wait_exit();
    assert!(
        !status.success(),
        "exit 0 without a database file:\n{}",
        server.log.text()
    );
    assert!(server.log.text().contains("final mirror failed"));
}

#[test]
fn sigterm_takes_every_frame_a_unix_producer_wrote_even_past_the_drain_timeout() {
    // On a Unix socket a write that returned has put its bytes in the server's receive queue:
    // every such frame must be taken, also from a producer that never stops sending and is
    // hung up on when the drain timeout passes.
    let mut server = TestServer::start(&[]);
    let sock = server.unix.clone().expect("unix");
    let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let producer = {
        let written = written.clone();
        thread::spawn(move || {
            let mut c = Client::unix(&sock);
            let deadline = Instant::now() + DEADLINE;
            let mut i = 0usize;
            while Instant::now() < deadline {
                let mut frame = Vec::new();
                phpmq::codec::encode_frame(
                    &mut frame,
                    phpmq::codec::MessageType::Send,
                    &[
                        (phpmq::codec::PacketType::Queue, b"unstoppable"),
                        (phpmq::codec::PacketType::Content, i.to_string().as_bytes()),
                    ],
                );
                if c.try_raw(&frame).is_err() {
                    return;
                }
                i += 1;
                written.store(i, Ordering::SeqCst);
            }
            panic!("the server never hung up on the producer");
        })
    };
    common::wait_until("the producer to get going", || {
        written.load(Ordering::SeqCst) > 1000
    });
    server.signal("TERM");
    let status = server.wait_exit();
    assert!(status.success(), "{status:?}\n{}", server.log.text());
    assert!(
        server.log.text().contains("hanging up"),
        "the producer outlasted the drain timeout:\n{}",
        server.log.text()
    );
    producer.join().expect("producer");
    let written = written.load(Ordering::SeqCst);

    let server = server.restart();
    let recovered = server.recovered();
    let mut consumer = server.tcp_client();
    let got = drain(&mut consumer, "unstoppable");
    let got = texts(&got);
    assert!(
        got.len() >= written,
        "{written} writes returned, {recovered} messages recovered ({} lost)",
        written - got.len()
    );
    // Every one, in order; at most the frame whose write failed may follow.
    let out_of_place = (0..written).find(|&i| got[i] != i.to_string());
    assert_eq!(out_of_place, None, "not the messages sent, in order");
    assert!(got.len() <= written + 1, "{} recovered", got.len());
}

/// A file from before PHPMQ v1.2 (schema version 1: no due time, no delivery count) is loaded,
/// its messages have no delay and no dispatch counted, and the server writes it in the current
/// form, which a restart reads back.
#[test]
fn a_file_from_before_v1_2_is_loaded_and_rewritten() {
    let dir = TempDir::new("v1file");
    let db = dir.path().join("phpmq.sqlite");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "PRAGMA page_size = 16384; PRAGMA auto_vacuum = INCREMENTAL;
         CREATE TABLE phpmq_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
         INSERT INTO phpmq_meta (key, value) VALUES ('format', 'phpmq');
         CREATE TABLE messages (seq INTEGER PRIMARY KEY, id BLOB NOT NULL, queue TEXT NOT NULL,
             content BLOB NOT NULL, accepted_at INTEGER NOT NULL, expires_at INTEGER);
         PRAGMA user_version = 1;",
    )
    .unwrap();
    for seq in 1..=3i64 {
        conn.execute(
            "INSERT INTO messages VALUES (?1, ?2, 'old', ?3, 0, NULL)",
            rusqlite::params![
                seq,
                &(seq as u128 + 0xabc0).to_be_bytes()[..],
                format!("v1 message {seq}").as_bytes()
            ],
        )
        .unwrap();
    }
    drop(conn);
    let sock = dir.path().join("phpmq.sock");
    let args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--listen",
        &format!("unix:{}", sock.display()),
        "--db",
        db.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut server = TestServer::start_with(dir, args);
    assert_eq!(server.recovered(), 3);
    server.signal("TERM");
    assert!(server.wait_exit().success());
    let conn = rusqlite::Connection::open(&db).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 2, "written in the current form");
    let columns: (Option<i64>, i64) = conn
        .query_row(
            "SELECT due_at, deliveries FROM messages WHERE seq = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(columns, (None, 0));
    drop(conn);

    let server = server.restart();
    assert_eq!(server.recovered(), 3);
    let mut consumer = server.tcp_client();
    consumer.consume("old", 3);
    for seq in 1..=3 {
        let d = consumer.recv();
        assert_eq!(d.text(), format!("v1 message {seq}"));
        assert_eq!(d.id, format!("{:032x}", seq as u128 + 0xabc0));
    }
}
