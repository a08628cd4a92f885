@0xecb7065ed3d1122c;
# The capsa capability schema. One file for every side: the host, the WASM
# guests and the microVM agent all compile this same schema.

interface Executor {
  # Turns bytes into running processes. The root Executor is what PID0
  # bootstraps; children get one with their parent's limits and one less level
  # of nesting, unless their parent chose another capability for them.

  runBytes @0 (bytes :Data, args :List(Text), env :List(EnvVar), options :Options)
           -> (process :Process);
  # The format is detected from the bytes: a WASM component, a WASM core module
  # (WASI preview 1) or an x86-64 ELF executable (microVM). Anything else fails
  # with an exception that says what the bytes were. Bad modules, missing
  # imports and exceeded quotas also fail here, before a Process exists.
  #
  # The child's argv is `options.name` followed by `args`, for every format:
  # args are argv[1..], never argv[0]. `env` is the whole environment.

  echo @1 (message :Text) -> (response :Text);
  # Returns the message unchanged. For transport tests and benchmarks.

  directories @2 () -> (grants :List(Grant));
  # The directories granted to whoever holds this Executor, each at the path
  # its grantor chose: for PID0 those of `capsa run --dir` (also its WASI
  # preopens), for a client of `capsa serve` those of `--dir NAME=PATH` (at
  # NAME), for a child those its parent gave in `Options.directories` (its
  # own Executor, when it inherits one). Empty when there are none: a host
  # path is reachable only through such a grant. A microVM's Executor (an
  # ELF process's `bootstrap()`) lists one: "/", the machine's own
  # filesystem, to put files into the machine and take results out.

  load @3 (bytes :Data) -> (program :Program);
  # The bytes checked (and compiled, for WebAssembly) once, as a Program to
  # run any number of times without sending them again. Fails as `runBytes`
  # would for bytes that cannot run here. The Program runs its processes
  # through this Executor, with its limits and quotas, whoever calls `run`:
  # handing it on gives the power to run this program, nothing more.

  program @4 (hash :Data) -> (program :Program);
  # The program whose SHA-256 is `hash` (32 bytes), if this host holds its
  # bytes (loaded by anyone since it started and not yet evicted from its
  # bounded program table), as a Program of this Executor; `notFound`
  # otherwise, and the caller then `load`s the bytes. Knowing a program's
  # hash is enough to run it: a host shared by clients who must not run
  # each other's programs should not be shared.

  network @5 () -> (network :Network);
  # The Network granted to whoever holds this Executor: for PID0 that of
  # `capsa run --net`, for a client of `capsa serve` that of `--net`, for
  # a child the one its parent gave in `Options.network` (its own
  # Executor, when it inherits one). `denied` when there is none: no
  # network is ever ambient.
}

interface Program {
  # Bytes an Executor has loaded. Dropping it frees nothing a running
  # process needs.

  run @0 (args :List(Text), env :List(EnvVar), options :Options)
      -> (process :Process);
  # As the loading Executor's `runBytes` with these bytes. Pipelined,
  # `load(...).program.run(...).process.wait()` is one round trip.

  info @1 () -> (hash :Data, size :UInt64, format :Text);
  # The SHA-256 of the bytes, their length, and what they are ("component",
  # "module" or "elf").
}

struct Grant {
  # A directory given at a path.
  path @0 :Text;
  # Where the grantee sees it: a WASM child's WASI preopen, the mount point
  # in a microVM, the name in a `capsa serve --dir` list.
  directory @1 :Directory;
}

interface Directory {
  # A directory and everything under it, nothing outside it. Paths are
  # relative, '/'-separated and UTF-8: an absolute path, a `..` component,
  # a NUL byte or a symbolic link that leads outside fails with `badPath`;
  # "" and "." name the directory itself. A read-only view refuses every
  # change with `readOnly`, and so do the views and files taken from it.
  # Failures carry the kinds notFound, exists, notADirectory, isADirectory,
  # notEmpty, readOnly, badPath, noSpace and quota.

  list @0 (path :Text) -> (entries :List(Entry));
  # The entries of the directory at `path`, in no particular order, without
  # "." and "..". More than 100,000 fail with `tooLarge`.

  stat @1 (path :Text) -> (info :Info);
  # What is at `path` (a symbolic link is followed, within the directory).

  read @2 (path :Text) -> (source :ByteSource);
  # The file's bytes from the start; `eof` comes with the last of them.

  write @3 (path :Text, mode :WriteMode) -> (sink :ByteSink);
  # A file to write, created if missing. The data is in the file once
  # `close` has returned; a failure (no space, the quota) fails the `write`
  # or `close` it happened in.

  mkdir @4 (path :Text);
  # One new directory; its parent must exist.

  remove @5 (path :Text);
  # A file, a symbolic link or an empty directory.

  rename @6 (from :Text, to :Text);
  # Within this directory; replaces a file at `to`.

  sub @7 (path :Text, readOnly :Bool) -> (directory :Directory);
  # The directory at `path` as a capability of its own, read-only if asked
  # or if this one is.
}

enum WriteMode {
  truncate @0;
  # Replace what the file held.
  append @1;
  # Write after its end.
  createNew @2;
  # Fail with `exists` if it is there.
}

struct Entry {
  name @0 :Text;
  info @1 :Info;
}

struct Info {
  kind @0 :EntryKind;
  size @1 :UInt64;
  # Bytes, for a file.
  modifiedNanos @2 :Int64;
  # Last modification, in nanoseconds since the Unix epoch.
}

enum EntryKind {
  file @0;
  directory @1;
  symlink @2;
  # Only in `list`: `stat` follows links.
  other @3;
}

enum ErrorKind {
  # What an exception from capsa is about. Every exception the host and the
  # agent raise has a description of the form "<kind>: <message>", <kind>
  # being one of these names as written here (a message without one is
  # `failed`). Across connections capnp-rpc puts "remote exception: " in
  # front, once per hop; `capsa_schema::error::kind` skips those. Match the
  # kind, never the message: the message is for people and may change.
  failed @0;
  # Anything not below.
  badRequest @1;
  # A malformed argument: text that is not UTF-8 or holds a NUL, an
  # environment variable name with '='.
  badPayload @2;
  # The bytes are not a program this host runs: unknown format, invalid
  # WebAssembly, a module without `_start`, a 32-bit ELF.
  link @3;
  # The program imports something this host does not provide.
  quota @4;
  # A quota of the Executor asked: nesting depth or live children.
  hostFull @5;
  # The host already runs its maximum of guests.
  tooLarge @6;
  # A microVM larger than the caller may have (memory limit, vCPUs).
  vmDisabled @7;
  # The bytes are an ELF and this host runs no microVMs.
  vm @8;
  # The microVM did not boot, or its agent did not answer or refused.
  shuttingDown @9;
  # The host is shutting down and starts nothing more.
  wrongMode @10;
  # A stdio stream of a process in RPC mode, or the bootstrap capability of
  # one in data mode.
  notFound @11;
  # No file or directory at that path.
  exists @12;
  # Something is already at that path.
  notADirectory @13;
  # A path goes through, or names, something that is not a directory.
  isADirectory @14;
  # A file operation on a directory.
  notEmpty @15;
  # Removing a directory that still has entries.
  readOnly @16;
  # A change through a read-only view.
  badPath @17;
  # An absolute path, a `..`, a NUL byte, or a link that leads outside.
  noSpace @18;
  # The filesystem, or the grant's quota, is full.
  denied @19;
  # A Network view does not allow that destination (the message names the
  # rule that refused it), or there is no Network.
  unreachable @20;
  # An allowed destination did not answer: no address, connection refused
  # or timed out.
}

struct EnvVar {
  name @0 :Text;
  value @1 :Text;
}

enum StdioMode {
  rpc @0;
  # stdin/stdout carry the child's own Cap'n Proto connection; its bootstrap
  # is `Options.bootstrap`, its export is `Process.bootstrap()`.
  data @1;
  # stdin/stdout/stderr are plain byte streams reached through the Process,
  # so an unmodified WASI CLI program runs.
}

struct Options {
  # Zero means "inherit from the parent" for every limit.

  memoryLimitBytes @0 :UInt64;
  # Upper bound on the child's linear memories and tables together (a
  # table element counts 8 bytes). A microVM's memory counts against it.
  deadlineMillis @1 :UInt64;
  # Wall-clock deadline from the start; the child is killed when it passes.
  cpuBudgetMillis @2 :UInt64;
  # CPU time the child may spend executing guest code, in milliseconds
  # (counted in epoch ticks).
  stdio @3 :StdioMode;
  name @4 :Text;
  # The child's argv[0], and the label of its log lines. Unset or empty,
  # argv[0] is "busybox" and the log label is generated: only multi-call
  # programs act on argv[0], and busybox then runs the applet named by
  # args[0] (args ["echo", "hi"] run `echo hi`); other programs only show
  # it in their messages.

  bootstrap :union {
    # What the child gets when it bootstraps its connection (RPC mode only).
    inherit @5 :Void;
    # An Executor with the parent's limits and one less level of nesting.
    none @6 :Void;
    # No capability: calls on the child's bootstrap fail.
    capability @7 :AnyPointer;
    # Exactly this capability: the parent's own Executor, an attenuated
    # wrapper the parent implements, a microVM's Executor, ...
  }

  vm :group {
    # microVM options (ELF bytes only).
    vcpus @8 :UInt32;
    # Zero: the host's default. At most the host's CPU count.
    memoryMib @9 :UInt32;
    # Zero: the host's default narrowed to the caller's memory limit. The
    # machine's memory counts against that limit: more is refused.
    kernel @10 :Data;
    initramfs @11 :Data;
  }

  directories @12 :List(Grant);
  # Directories the child may use, each at its path. A WASM child sees each
  # as a WASI preopen (read-only views stay read-only) and lists them with
  # its Executor's `directories`; nothing else of the host's filesystem.
  # An ELF gets each copied into its machine at its path (absolute, or
  # relative to `/`, its working directory; the path must be missing or an
  # empty directory, and must not overlap another running program's grant)
  # before it starts; what it changed there is written back, and the copy
  # removed, before `wait` answers. At most 256 MiB and 10,000 entries per
  # grant.

  stdoutTo @13 :ByteSink;
  stderrTo @14 :ByteSink;
  # Data mode: the child's stdout (stderr) is pushed into this sink as it
  # comes, `write` by `write`, and the sink closed at the stream's end. The
  # child is held back while the sink's writes are not taken (`-> stream`
  # flow control), so nothing is buffered without bound, and nobody polls:
  # a caller may `wait` first, which answers once the pushed streams are
  # closed. `Process.stdout` (`stderr`) then fails. If the sink fails, the
  # rest of the stream is read and dropped, so the child is never stuck on
  # a caller that went away. Unset: pull the stream with `Process.stdout`.

  network @15 :Network;
  # The network the child may reach, as its Executor's `network()`. Unset:
  # none, whatever its parent has (a network is granted, never inherited).
  # Narrow it with `Network.restrict` before handing it on.
}

interface Process {
  # A running child. Dropping the last reference kills it.

  wait @0 () -> (status :ExitStatus);
  # Resolves when the child has ended; any number of concurrent waiters get
  # the same answer.

  kill @1 ();
  # Ends the child at once, even inside an infinite loop.

  stdin @2 () -> (sink :ByteSink);
  stdout @3 () -> (source :ByteSource);
  stderr @4 () -> (source :ByteSource);
  # The child's stdio in data mode. In RPC mode stdin/stdout carry the
  # connection and these fail; stderr is then the host log.

  bootstrap @5 () -> (cap :AnyPointer);
  # The capability the child exports on its connection (RPC mode). An ELF
  # executable has no connection: its bootstrap is the Executor of the
  # machine it runs in, to run more there (the agent's Executor).
}

interface ByteSink {
  write @0 (data :Data) -> stream;
  # Flow-controlled: the caller is held back while the child does not read.
  close @1 ();
  # End of stream: the child reads EOF. Returns once every byte written
  # before it has been taken.
  #
  # Wait for the call that hands out a sink before writing into it rather
  # than pipelining on it: capsa's servers use capnp-rpc 0.27, whose calls
  # queued on a capability that has not resolved yet may be dispatched
  # out of order when it resolves, so a pipelined `close` can overtake the
  # `write`s before it. Calls on a resolved sink arrive in order.
}

interface ByteSource {
  read @0 (maxBytes :UInt32) -> (data :Data, eof :Bool);
  # Up to maxBytes; waits until at least one byte is there or the stream
  # ended. The child is held back while nobody reads (bounded buffer).
  # `eof`: the stream has ended and `data` (possibly empty) is its last:
  # a stream read after its writer is done says so with its last bytes,
  # not one call later. Once `eof` has been given, reads return no data
  # and `eof` again.
}

struct ExitStatus {
  union {
    exited @0 :Int32;
    # The child returned or called exit with this code.
    trapped @1 :Text;
    # A WebAssembly trap (including a Rust panic); the text says which.
    killed @2 :Void;
    # Process.kill, the last reference dropped, or the parent went away.
    deadlineExceeded @3 :Void;
    cpuBudgetExceeded @4 :Void;
    outOfMemory @5 :UInt64;
    # The child trapped after the host refused to grow its memory past this
    # limit (bytes).
    failed @6 :Text;
    # The child could not run to completion for a reason outside the guest
    # (instantiation failed, the VM did not boot, ...).
  }
}

interface Network {
  # A view of the network: which destinations its holder may reach, and
  # how many connections it may hold at once. A view is narrowed with
  # `restrict`, never widened; a connection is made only if every view from
  # the one granted at the top down to the one used allows it. Dropping
  # every reference to a view (or ending the process it was granted to)
  # closes the connections made through it and the views made from it.

  connect @0 (host :Text, port :UInt16) -> (connection :Connection);
  # A TCP connection to `host` (a name, or an IPv4 or IPv6 address) at
  # `port`. A name must match the view's `hosts` and is resolved by the
  # view (its pins, else DNS); an address must lie in its `ranges`. Either
  # way the address actually connected to is checked too: private,
  # loopback and link-local addresses only where the view allows them,
  # even when a permitted name resolves to one. Fails with `denied` (the
  # rule that refused), `unreachable` (nothing answered within 10 s, or the
  # connection was refused) or `quota` (the view's connection limit).

  resolve @1 (host :Text) -> (addresses :List(Text));
  # The addresses of `host` the view would connect to, in the order it
  # would try them: its pins for that name, else DNS's answer without
  # the addresses it does not allow. `denied` for a name outside the view.

  restrict @2 (rules :NetRules) -> (network :Network);
  # A view that allows what this view and `rules` both allow. Its pins
  # must give addresses this view allows (`denied` otherwise): a pin never
  # widens what a name may reach.
}

struct NetRules {
  # What a view allows. Every list empty allows nothing.

  hosts @0 :List(Text);
  # Names a connection may be asked for: exact ("api.example.com"), every
  # name below a domain ("*.example.com", not example.com itself), or every
  # name ("*"). Case and a final dot do not matter.
  ranges @1 :List(Text);
  # Addresses a connection may be asked for, in CIDR notation ("10.1.0.0/16",
  # "2001:db8::/32", "0.0.0.0/0" for every IPv4 address); an address alone
  # is a range of one.
  ports @2 :List(PortRange);
  # Ports a connection may go to. Empty: every port.
  allowPrivate @3 :Bool;
  # Private addresses (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7)
  # may be reached. Never by default.
  allowLoopback @4 :Bool;
  # Loopback addresses (127/8, ::1) may be reached. Never by default.
  allowLinkLocal @5 :Bool;
  # Link-local addresses (169.254/16, fe80::/10) may be reached. Never by
  # default. Unspecified, multicast and broadcast addresses never are.
  maxConnections @6 :UInt32;
  # Connections open at once through this view and the views made from
  # it. Zero: no limit of its own (its parent's still holds).
  pins @7 :List(Pin);
  # Names this view resolves itself, without DNS, for itself and the views
  # made from it.
}

struct PortRange {
  first @0 :UInt16;
  last @1 :UInt16;
  # Inclusive; `last` below `first` is a range of one, `first`.
}

struct Pin {
  host @0 :Text;
  addresses @1 :List(Text);
  # IP addresses, tried in this order.
}

interface Connection {
  # Both directions of a TCP connection. Dropping it closes the
  # connection.

  input @0 () -> (source :ByteSource);
  # What the peer sends; `eof` once it has closed its side.
  output @1 () -> (sink :ByteSink);
  # What goes to the peer; `close` ends this side only (the peer reads
  # end of stream and may still answer).
  addresses @2 () -> (local :Text, peer :Text);
  # Both ends as "ADDRESS:PORT" ("[ADDRESS]:PORT" for IPv6).
}
