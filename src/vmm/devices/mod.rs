//! Legacy devices: an 8250 serial port (vm-superio) whose output goes to the VM's
//! [`Console`], and the i8042 controller's reset line, which ends the VM. For the
//! built-in guest the serial port raises no interrupt; for a Linux guest it raises IRQ 4
//! through an irqfd, and the CMOS index/data ports read as zero (no RTC update in
//! progress, so nothing polls them forever).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard};

use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// First port of COM1.
pub const SERIAL_BASE: u16 = 0x3f8;
/// i8042 data and command/status ports.
pub const I8042_DATA: u16 = 0x60;
pub const I8042_CMD: u16 = 0x64;
/// i8042 command that pulses the CPU reset line.
pub const I8042_RESET: u8 = 0xfe;

/// Lines the console keeps for late subscribers.
const BACKLOG_LINES: usize = 256;

/// The VM's console: serial output and the VMM's report lines, one line at a time, kept
/// in a short backlog and sent to every subscriber.
#[derive(Default)]
pub struct Console {
    inner: Mutex<ConsoleInner>,
}

#[derive(Default)]
struct ConsoleInner {
    partial: Vec<u8>,
    backlog: VecDeque<String>,
    subscribers: Vec<Sender<String>>,
    echo: bool,
    file: Option<std::fs::File>,
}

impl Console {
    fn lock(&self) -> MutexGuard<'_, ConsoleInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Also print every line on the VMM's standard output, starting with the backlog:
    /// the guest runs before its VMM can set this, and its first lines must not be lost.
    pub fn set_echo(&self, echo: bool) {
        let mut c = self.lock();
        if echo && !c.echo {
            let mut out = io::stdout().lock();
            for line in &c.backlog {
                let _ = writeln!(out, "{line}");
            }
        }
        c.echo = echo;
    }

    /// Also append every line to `file`, starting with the backlog (as for the echo).
    pub fn set_file(&self, mut file: std::fs::File) {
        let mut c = self.lock();
        for line in &c.backlog {
            let _ = writeln!(file, "{line}");
        }
        c.file = Some(file);
    }

    /// Adds a complete line.
    pub fn line(&self, line: String) {
        let mut c = self.lock();
        if c.echo {
            // A closed stdout must not take the VM down (println! would panic).
            let _ = writeln!(io::stdout().lock(), "{line}");
        }
        if let Some(f) = &mut c.file {
            let _ = writeln!(f, "{line}");
        }
        c.subscribers.retain(|s| s.send(line.clone()).is_ok());
        if c.backlog.len() == BACKLOG_LINES {
            c.backlog.pop_front();
        }
        c.backlog.push_back(line);
    }

    /// Adds raw bytes (serial output); complete lines are passed on.
    pub fn bytes(&self, data: &[u8]) {
        let mut lines = Vec::new();
        {
            let mut c = self.lock();
            for &b in data {
                if b == b'\n' {
                    let l = std::mem::take(&mut c.partial);
                    lines.push(String::from_utf8_lossy(&l).into_owned());
                } else if c.partial.len() < 4096 {
                    c.partial.push(b);
                }
            }
        }
        for l in lines {
            self.line(l);
        }
    }

    /// The backlog, then every new line.
    pub fn subscribe(&self) -> (Vec<String>, Receiver<String>) {
        let (tx, rx) = channel();
        let mut c = self.lock();
        c.subscribers.push(tx);
        (c.backlog.iter().cloned().collect(), rx)
    }
}

/// The serial port's interrupt line: none for the built-in guest (it polls nothing and
/// runs with interrupts disabled), an irqfd for a Linux guest.
pub struct IrqLine(pub Option<EventFd>);

impl Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        match &self.0 {
            Some(fd) => fd.write(1),
            None => Ok(()),
        }
    }
}

/// Serial output sink writing into the console.
pub struct ConsoleWriter(pub Arc<Console>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.bytes(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a port access did.
#[derive(Debug, PartialEq, Eq)]
pub enum PortAction {
    Handled,
    /// The guest asked for a reset (i8042 command 0xfe).
    Reset,
    Unhandled,
}

/// The legacy devices on the I/O port bus.
pub struct Devices {
    serial: Mutex<Serial<IrqLine, vm_superio::serial::NoEvents, ConsoleWriter>>,
    /// A Linux guest's machine: CMOS ports answer.
    linux: bool,
}

/// CMOS index and data ports.
pub const CMOS_INDEX: u16 = 0x70;
pub const CMOS_DATA: u16 = 0x71;

/// The serial port's registers, serializable (vm-superio's `SerialState` is not).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl Devices {
    /// Devices in their reset state, or with the serial port of `serial`; the serial
    /// port raises `irq` (if any). `linux` adds what a Linux guest's machine has.
    pub fn new(
        console: Arc<Console>,
        serial: Option<&SerialSnapshot>,
        irq: Option<EventFd>,
        linux: bool,
    ) -> Self {
        let irq = IrqLine(irq);
        let port = match serial {
            Some(s) => {
                let state = s.into();
                let events = vm_superio::serial::NoEvents;
                match Serial::from_state(&state, irq, events, ConsoleWriter(console.clone())) {
                    Ok(p) => p,
                    // Only a failing interrupt on a pending THRE: start it without one.
                    Err(_) => Serial::new(IrqLine(None), ConsoleWriter(console)),
                }
            }
            None => Serial::new(irq, ConsoleWriter(console)),
        };
        Devices { serial: Mutex::new(port), linux }
    }

    /// The serial port's state.
    pub fn serial_state(&self) -> SerialSnapshot {
        self.serial().state().into()
    }

    fn serial(&self) -> MutexGuard<'_, Serial<IrqLine, vm_superio::serial::NoEvents, ConsoleWriter>> {
        self.serial.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A guest `out` to `port`.
    pub fn port_write(&self, port: u16, data: &[u8]) -> PortAction {
        match port {
            SERIAL_BASE..=0x3ff => {
                if let Some(&b) = data.first() {
                    // A write error only means the (infallible) console sink failed.
                    let _ = self.serial().write((port - SERIAL_BASE) as u8, b);
                }
                PortAction::Handled
            }
            I8042_CMD if data.first() == Some(&I8042_RESET) => PortAction::Reset,
            I8042_DATA | I8042_CMD => PortAction::Handled,
            CMOS_INDEX | CMOS_DATA if self.linux => PortAction::Handled,
            _ => PortAction::Unhandled,
        }
    }

    /// A guest `in` from `port`; unbacked ports read as all ones.
    pub fn port_read(&self, port: u16, data: &mut [u8]) -> PortAction {
        match port {
            SERIAL_BASE..=0x3ff => {
                let v = self.serial().read((port - SERIAL_BASE) as u8);
                data.iter_mut().for_each(|d| *d = v);
                PortAction::Handled
            }
            // i8042: output buffer empty, input buffer empty.
            I8042_DATA | I8042_CMD => {
                data.fill(0);
                PortAction::Handled
            }
            CMOS_INDEX | CMOS_DATA if self.linux => {
                data.fill(0);
                PortAction::Handled
            }
            _ => {
                data.fill(0xff);
                PortAction::Unhandled
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_output_reaches_console_subscribers_as_lines() {
        let console = Arc::new(Console::default());
        let dev = Devices::new(console.clone(), None, None, false);
        let (backlog, rx) = console.subscribe();
        assert!(backlog.is_empty());
        for b in b"hello\nwor" {
            assert_eq!(dev.port_write(SERIAL_BASE, &[*b]), PortAction::Handled);
        }
        assert_eq!(rx.try_recv().unwrap(), "hello");
        assert!(rx.try_recv().is_err(), "partial line held back");
        let (backlog, _) = console.subscribe();
        assert_eq!(backlog, vec!["hello".to_string()]);
    }

    #[test]
    fn a_console_file_set_after_the_guest_started_still_gets_its_first_lines() {
        let console = Console::default();
        console.bytes(b"Linux version 6.1\nearly\n");
        let path = std::env::temp_dir().join(format!("vmfork-console-{}.log", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        console.set_file(file);
        console.line("later".into());
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(text, "Linux version 6.1\nearly\nlater\n");
    }

    #[test]
    fn serial_state_round_trips_through_json() {
        let dev = Devices::new(Arc::new(Console::default()), None, None, false);
        dev.port_write(SERIAL_BASE + 7, &[0x5a]); // scratch register
        dev.port_write(SERIAL_BASE + 3, &[0x03]); // line control: 8 bits
        let snap = dev.serial_state();
        let json = serde_json::to_string(&snap).unwrap();
        let back: SerialSnapshot = serde_json::from_str(&json).unwrap();
        let restored = Devices::new(Arc::new(Console::default()), Some(&back), None, false);
        assert_eq!(restored.serial_state(), snap);
        let mut b = [0u8];
        restored.port_read(SERIAL_BASE + 7, &mut b);
        assert_eq!(b, [0x5a]);
    }

    #[test]
    fn i8042_reset_is_reported() {
        let dev = Devices::new(Arc::new(Console::default()), None, None, false);
        assert_eq!(dev.port_write(I8042_CMD, &[I8042_RESET]), PortAction::Reset);
        assert_eq!(dev.port_write(I8042_CMD, &[0x20]), PortAction::Handled);
        let mut b = [1u8];
        dev.port_read(I8042_CMD, &mut b);
        assert_eq!(b, [0]);
        assert_eq!(dev.port_read(0x80, &mut b), PortAction::Unhandled);
        assert_eq!(b, [0xff]);
    }
}
