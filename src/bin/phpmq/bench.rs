//! `phpmq bench`: P producers and C consumers on one fresh queue, end to end, with latency
//! percentiles. Each payload starts with its send time and its index, so every delivery is
//! timed and lost or duplicated messages are counted.

use argh::FromArgs;
use phpmq::client::{Client, ClientError};
use phpmq::config::ListenAddr;
use phpmq::hello::{Feature, Version};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Measure end-to-end throughput and latency: P producers send N messages of S bytes to a
/// fresh queue while C consumers, each holding up to K, receive and acknowledge them. Prints
/// progress on stderr and one key=value result line on stdout.
#[derive(FromArgs)]
#[argh(subcommand, name = "bench")]
pub struct BenchArgs {
    /// producers (default 1)
    #[argh(option, short = 'P', default = "1")]
    producers: usize,

    /// consumers (default 1)
    #[argh(option, short = 'C', default = "1")]
    consumers: usize,

    /// messages in all (default 100000)
    #[argh(option, short = 'N', default = "100000")]
    messages: usize,

    /// payload size in bytes, at least 16 (default 256)
    #[argh(option, short = 'S', default = "256")]
    size: usize,

    /// prefetch: unacknowledged messages each consumer may hold (default 16)
    #[argh(option, short = 'K', default = "16")]
    prefetch: u64,

    /// total send rate in messages per second; 0 sends as fast as possible (default 0)
    #[argh(option, default = "0")]
    rate: u64,

    /// give up after this many seconds (default 300)
    #[argh(option, default = "300")]
    timeout: u64,

    /// confirmed sends (PHPMQ v1.2): each producer waits for the server's receipts, with at
    /// most -W sends unanswered at a time, as confirmed sends to other brokers are measured
    #[argh(switch)]
    confirm: bool,

    /// sends a producer may have unanswered at once, for --confirm (default 1: each send
    /// waits for its receipt)
    #[argh(option, short = 'W', default = "1")]
    window: usize,

    /// durable receipts, for --confirm (each one once the message is synced to disk)
    #[argh(switch)]
    durable: bool,
}

/// How long before a paced send the producer stops sleeping and spins.
const PACING_SPIN: Duration = Duration::from_micros(300);

/// How producers send: fire and forget (v1), or waiting for receipts (v1.2).
#[derive(Clone, Copy)]
enum Sending {
    Unconfirmed,
    /// At most this many sends unanswered.
    Confirmed(usize),
}

/// What the run shares between its threads.
struct Run {
    start: Instant,
    queue: String,
    total: usize,
    delivered: AtomicUsize,
    duplicates: AtomicUsize,
    foreign: AtomicUsize,
    seen: Vec<AtomicU64>,
    done: AtomicBool,
    latencies_ns: Mutex<Vec<u64>>,
    /// With --confirm: from each send to its receipt.
    receipt_ns: Mutex<Vec<u64>>,
}

impl Run {
    /// Marks message `index` as delivered; false if it already was.
    fn mark(&self, index: usize) -> bool {
        let bit = 1u64 << (index % 64);
        self.seen[index / 64].fetch_or(bit, Ordering::Relaxed) & bit == 0
    }
}

pub fn run(server: &ListenAddr, args: BenchArgs) -> Result<(), super::CliError> {
    if args.size < 16
        || args.producers == 0
        || args.consumers == 0
        || args.messages == 0
        || args.prefetch == 0
        || args.window == 0
        || args.timeout == 0
    {
        return Err(super::CliError::Usage(
            "phpmq bench: -S is at least 16, and -P, -C, -N, -K, -W and --timeout at least 1",
        ));
    }
    if args.durable && !args.confirm {
        return Err(super::CliError::Usage(
            "phpmq bench: --durable goes with --confirm",
        ));
    }
    let sending = if args.confirm {
        Sending::Confirmed(args.window)
    } else {
        Sending::Unconfirmed
    };
    let run = Arc::new(Run {
        start: Instant::now(),
        queue: super::private_queue("bench"),
        total: args.messages,
        delivered: AtomicUsize::new(0),
        duplicates: AtomicUsize::new(0),
        foreign: AtomicUsize::new(0),
        seen: (0..args.messages.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect(),
        done: AtomicBool::new(false),
        latencies_ns: Mutex::new(Vec::with_capacity(args.messages)),
        receipt_ns: Mutex::new(Vec::new()),
    });
    // Consumers first, subscribed before anything is sent.
    let mut consumers = Vec::new();
    for _ in 0..args.consumers {
        let mut client = Client::connect(server)?;
        client.set_read_timeout(Some(Duration::from_millis(200)))?;
        client.consume(&run.queue, args.prefetch)?;
        client.flush()?;
        let run = run.clone();
        consumers.push(thread::spawn(move || consume(client, &run)));
    }
    let started = Instant::now();
    let mut producers = Vec::new();
    for p in 0..args.producers {
        let mut client = Client::connect(server)?;
        if args.confirm {
            let wanted = if args.durable { "durable" } else { "" };
            let (version, served) = client.hello(wanted)?;
            if version < Version::V1_2 {
                return Err(super::CliError::NoV12("phpmq bench --confirm"));
            }
            if args.durable && !served.contains(Feature::Durable) {
                return Err(super::CliError::NotDurable("bench --durable"));
            }
        }
        let run = run.clone();
        let share =
            args.messages / args.producers + usize::from(p < args.messages % args.producers);
        let first: usize = (0..p)
            .map(|q| {
                args.messages / args.producers + usize::from(q < args.messages % args.producers)
            })
            .sum();
        let (size, rate, producers_n) = (args.size, args.rate, args.producers as u64);
        producers.push(thread::spawn(move || {
            produce(
                client,
                &run,
                (first, share),
                size,
                rate / producers_n.max(1),
                sending,
            )
        }));
    }
    let deadline = started + Duration::from_secs(args.timeout);
    let mut last_report = Instant::now();
    while run.delivered.load(Ordering::Relaxed) < run.total {
        if Instant::now() > deadline {
            break;
        }
        thread::sleep(Duration::from_millis(20));
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            eprintln!(
                "phpmq bench: {} of {} delivered after {:.1} s",
                run.delivered.load(Ordering::Relaxed),
                run.total,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let elapsed = started.elapsed();
    run.done.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for handle in producers.into_iter().chain(consumers) {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(_) => errors.push("a bench thread panicked".into()),
        }
    }
    report(&args, server, &run, elapsed);
    match errors.first() {
        Some(e) => Err(super::CliError::Client(ClientError::Io(io::Error::other(
            e.clone(),
        )))),
        None if run.delivered.load(Ordering::Relaxed) < run.total => {
            Err(super::CliError::BenchIncomplete)
        }
        None => Ok(()),
    }
}

/// Sends messages `first..first + count`, paced to `rate` a second if it is not 0.
fn produce(
    mut client: Client,
    run: &Run,
    (first, count): (usize, usize),
    size: usize,
    rate: u64,
    sending: Sending,
) -> Result<(), ClientError> {
    // Send times of the sends not answered yet, oldest first: receipts come in order.
    let mut unanswered = std::collections::VecDeque::new();
    let mut receipt_ns = Vec::new();
    let mut take_receipt = |client: &mut Client,
                            unanswered: &mut std::collections::VecDeque<u64>|
     -> Result<(), ClientError> {
        client.recv_receipt()??;
        if let Some(sent) = unanswered.pop_front() {
            let now = run.start.elapsed().as_nanos() as u64;
            receipt_ns.push(now.saturating_sub(sent));
        }
        Ok(())
    };
    let mut payload = vec![b'.'; size];
    let interval = (rate > 0).then(|| Duration::from_secs_f64(1.0 / rate as f64));
    let begin = run.start.elapsed();
    for i in 0..count {
        let sent_at = match interval {
            Some(interval) => {
                // Paced: the scheduled time counts, so a late send shows up as latency.
                let due = begin + interval * i as u32;
                // A sleeping thread wakes 50-100 µs late: sleep to just short of the due time
                // and spin the rest, or the bench's own lateness would count as latency.
                let now = run.start.elapsed();
                if due > now + PACING_SPIN {
                    thread::sleep(due - now - PACING_SPIN);
                }
                while run.start.elapsed() < due {
                    std::hint::spin_loop();
                }
                due
            }
            None => run.start.elapsed(),
        };
        payload[..8].copy_from_slice(&(sent_at.as_nanos() as u64).to_le_bytes());
        payload[8..16].copy_from_slice(&((first + i) as u64).to_le_bytes());
        match sending {
            Sending::Unconfirmed => {
                client.send(&run.queue, &payload, None)?;
                if interval.is_some() {
                    client.flush()?;
                }
            }
            Sending::Confirmed(window) => {
                client.send_v12(&run.queue, &payload, None, None)?;
                // When it was queued for writing: the receipt's latency runs from here.
                unanswered.push_back(run.start.elapsed().as_nanos() as u64);
                if unanswered.len() >= window {
                    take_receipt(&mut client, &mut unanswered)?;
                } else if interval.is_some() {
                    client.flush()?;
                }
            }
        }
    }
    while !unanswered.is_empty() {
        take_receipt(&mut client, &mut unanswered)?;
    }
    if let Ok(mut all) = run.receipt_ns.lock() {
        all.extend(receipt_ns);
    }
    client.flush()
}

fn consume(mut client: Client, run: &Run) -> Result<(), ClientError> {
    let mut latencies = Vec::new();
    let result = loop {
        if run.done.load(Ordering::Relaxed) {
            break Ok(());
        }
        let d = match client.recv() {
            Ok(d) => d,
            Err(e) if e.is_timeout() => continue,
            Err(e) => break Err(e),
        };
        let now = run.start.elapsed().as_nanos() as u64;
        if let Err(e) = client.ack(&run.queue, &d.id) {
            break Err(e);
        }
        let (Some(sent), Some(index)) = (field(&d.content, 0), field(&d.content, 8)) else {
            run.foreign.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let index = index as usize;
        if index >= run.total {
            run.foreign.fetch_add(1, Ordering::Relaxed);
        } else if run.mark(index) {
            latencies.push(now.saturating_sub(sent));
            run.delivered.fetch_add(1, Ordering::Relaxed);
        } else {
            run.duplicates.fetch_add(1, Ordering::Relaxed);
        }
    };
    let _ = client.flush();
    if let Ok(mut all) = run.latencies_ns.lock() {
        all.extend(latencies);
    }
    result
}

fn field(content: &[u8], at: usize) -> Option<u64> {
    content
        .get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
}

/// Percentile `q` of sorted nanoseconds, in microseconds (0 if there are none).
fn percentile_us(sorted_ns: &[u64], q: f64) -> f64 {
    sorted_ns
        .get(((sorted_ns.len() as f64 - 1.0) * q).round() as usize)
        .map(|ns| *ns as f64 / 1000.0)
        .unwrap_or(0.0)
}

fn report(args: &BenchArgs, server: &ListenAddr, run: &Run, elapsed: Duration) {
    let sorted = |times: &Mutex<Vec<u64>>| {
        let mut times = times.lock().map(|l| l.clone()).unwrap_or_default();
        times.sort_unstable();
        times
    };
    let latencies = sorted(&run.latencies_ns);
    let receipts = sorted(&run.receipt_ns);
    let at = |q: f64| percentile_us(&latencies, q);
    let receipt_at = |q: f64| percentile_us(&receipts, q);
    let delivered = run.delivered.load(Ordering::Relaxed);
    let secs = elapsed.as_secs_f64().max(1e-9);
    println!(
        "bench transport={} P={} C={} N={} S={} K={} rate={} confirm={} durable={} delivered={} lost={} dups={} foreign={} elapsed_s={:.3} msgs_per_s={:.0} MB_per_s={:.1} p50_us={:.0} p90_us={:.0} p99_us={:.0} p999_us={:.0} max_us={:.0} receipt_p50_us={:.0} receipt_p99_us={:.0}",
        match server {
            ListenAddr::Tcp(_) => "tcp",
            ListenAddr::Unix(_) => "unix",
        },
        args.producers,
        args.consumers,
        args.messages,
        args.size,
        args.prefetch,
        args.rate,
        if args.confirm { args.window.max(1) } else { 0 },
        u8::from(args.durable),
        delivered,
        run.total - delivered,
        run.duplicates.load(Ordering::Relaxed),
        run.foreign.load(Ordering::Relaxed),
        secs,
        delivered as f64 / secs,
        (delivered * args.size) as f64 / secs / 1e6,
        at(0.5),
        at(0.9),
        at(0.99),
        at(0.999),
        at(1.0),
        receipt_at(0.5),
        receipt_at(0.99)
    );
}
