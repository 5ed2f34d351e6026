//! Port-I/O devices ferry emulates in user space: the 16550 serial port on
//! COM1, an i8042 controller (guest reset and Ctrl-Alt-Del), the exit port
//! and the POST-code port that timestamps the first guest instruction.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1 base port.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's ISA IRQ.
pub const COM1_IRQ: u32 = 4;
/// i8042 data port.
pub const I8042_DATA: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_CMD: u16 = 0x64;
/// i8042 keyboard IRQ.
pub const I8042_IRQ: u32 = 1;
/// Writing a byte here ends the VM with that byte as exit status (QEMU's
/// isa-debug-exit lives at the same port).
pub const EXIT_PORT: u16 = 0xf4;
/// POST-code port; the first write marks "first guest instruction".
pub const POST_PORT: u16 = 0x80;

/// Raises an edge-triggered ISA interrupt through a KVM irqfd.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Why a device asks the VM to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceExit {
    /// The guest wrote its exit status to [`EXIT_PORT`].
    Status(u8),
    /// The guest asked the i8042 to pulse the reset line.
    Reset,
}

/// Serialisable i8042 state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// Controller configuration byte.
    pub control: u8,
    /// Command waiting for its data byte on port 0x60.
    pub pending: Option<u8>,
    /// Output buffer contents.
    pub buffer: Vec<u8>,
}

/// A small i8042: enough for Linux's probe, a guest-initiated reset, and
/// for the host to send Ctrl-Alt-Del (graceful shutdown).
pub struct I8042 {
    control: u8,
    pending: Option<u8>,
    buffer: VecDeque<u8>,
    irq: IrqLine,
}

const CTR_KBD_INT: u8 = 0x01;
const SB_OBF: u8 = 0x01;
const SB_SYSTEM: u8 = 0x04;
const SB_KEYLOCK: u8 = 0x10;

impl I8042 {
    fn new(irq: IrqLine) -> Self {
        I8042 { control: 0x45, pending: None, buffer: VecDeque::new(), irq }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend(bytes);
        if self.control & CTR_KBD_INT != 0 {
            let _ = self.irq.trigger();
        }
    }

    /// Queues Ctrl, Alt, Del make codes, the PC's "please shut down".
    pub fn ctrl_alt_del(&mut self) {
        self.push(&[0x1d, 0x38, 0x53]);
    }

    fn read(&mut self, port: u16) -> u8 {
        match port {
            I8042_DATA => self.buffer.pop_front().unwrap_or(0),
            _ => SB_SYSTEM | SB_KEYLOCK | if self.buffer.is_empty() { 0 } else { SB_OBF },
        }
    }

    fn write(&mut self, port: u16, v: u8) -> Option<DeviceExit> {
        if port == I8042_CMD {
            match v {
                0x20 => {
                    let c = self.control;
                    self.push(&[c]);
                }
                0x60 | 0xd1 | 0xd2 | 0xd3 | 0xd4 => self.pending = Some(v),
                0xaa => self.push(&[0x55]),
                0xa9 | 0xab => self.push(&[0x00]),
                0xfe => return Some(DeviceExit::Reset),
                _ => {}
            }
            return None;
        }
        match self.pending.take() {
            Some(0x60) => self.control = v,
            Some(0xd1) if v & 1 == 0 => return Some(DeviceExit::Reset),
            Some(0xd2) => self.push(&[v]),
            Some(_) => {}
            None => match v {
                0xff => self.push(&[0xfa, 0xaa]),
                0xf2 => self.push(&[0xfa, 0xab, 0x83]),
                _ => self.push(&[0xfa]),
            },
        }
        None
    }

    fn state(&self) -> I8042State {
        I8042State { control: self.control, pending: self.pending, buffer: self.buffer.iter().copied().collect() }
    }

    fn set_state(&mut self, s: &I8042State) {
        self.control = s.control;
        self.pending = s.pending;
        self.buffer = s.buffer.iter().copied().collect();
    }
}

/// Where the guest's serial output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// The port-I/O bus: routes vCPU I/O exits to devices.
pub struct PioBus {
    serial: Mutex<Serial<IrqLine, NoEvents, SerialOut>>,
    i8042: Mutex<I8042>,
    first_guest_io: OnceLock<Instant>,
}

/// Serialisable 16550 registers and receive FIFO (mirrors vm-superio's
/// `SerialState`, which has no serde support).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialRegs {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received but not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialRegs {
    fn from(s: SerialState) -> Self {
        SerialRegs {
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

impl From<&SerialRegs> for SerialState {
    fn from(s: &SerialRegs) -> Self {
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

/// Serialisable state of the user-space devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// 16550 registers and FIFO.
    pub serial: SerialRegs,
    /// i8042 controller.
    pub i8042: I8042State,
}

impl PioBus {
    /// Builds the bus; `serial_irq` and `kbd_irq` are irqfds registered on GSIs 4 and 1.
    pub fn new(out: SerialOut, serial_irq: EventFd, kbd_irq: EventFd) -> Self {
        PioBus {
            serial: Mutex::new(Serial::new(IrqLine(serial_irq), out)),
            i8042: Mutex::new(I8042::new(IrqLine(kbd_irq))),
            first_guest_io: OnceLock::new(),
        }
    }

    /// Handles an `in` instruction.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        let v = match port {
            COM1_BASE..=0x3ff => self.serial.lock().unwrap().read((port - COM1_BASE) as u8),
            I8042_DATA | I8042_CMD => self.i8042.lock().unwrap().read(port),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
        if port != I8042_DATA && port != I8042_CMD && !(COM1_BASE..=0x3ff).contains(&port) {
            data.fill(0xff);
        }
    }

    /// Handles an `out` instruction; returns a request to end the VM, if any.
    pub fn write(&self, port: u16, data: &[u8]) -> Option<DeviceExit> {
        let v = data.first().copied().unwrap_or(0);
        match port {
            COM1_BASE..=0x3ff => {
                let _ = self.serial.lock().unwrap().write((port - COM1_BASE) as u8, v);
                None
            }
            I8042_DATA | I8042_CMD => self.i8042.lock().unwrap().write(port, v),
            EXIT_PORT => Some(DeviceExit::Status(v)),
            POST_PORT => {
                let _ = self.first_guest_io.set(Instant::now());
                None
            }
            _ => None,
        }
    }

    /// Feeds bytes into the serial receive FIFO (console input); returns how many fit.
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        self.serial.lock().unwrap().enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Sends Ctrl-Alt-Del through the i8042.
    pub fn ctrl_alt_del(&self) {
        self.i8042.lock().unwrap().ctrl_alt_del();
    }

    /// Flushes serial output.
    pub fn flush(&self) {
        let _ = self.serial.lock().unwrap().writer_mut().flush();
    }

    /// When the guest first wrote the POST port.
    pub fn first_guest_io(&self) -> Option<Instant> {
        self.first_guest_io.get().copied()
    }

    /// Captures device state (the VM must be paused).
    pub fn save(&self) -> DevicesState {
        DevicesState { serial: self.serial.lock().unwrap().state().into(), i8042: self.i8042.lock().unwrap().state() }
    }

    /// Restores device state captured by [`PioBus::save`].
    pub fn restore(&self, s: &DevicesState) -> Result<(), crate::Error> {
        let mut serial = self.serial.lock().unwrap();
        let restored = Serial::from_state(
            &SerialState::from(&s.serial),
            IrqLine(serial.interrupt_evt().0.try_clone().map_err(crate::Error::Io)?),
            NoEvents,
            std::mem::replace(serial.writer_mut(), Box::new(std::io::sink())),
        )
        .map_err(|e| crate::Error::BadState(format!("serial: {e:?}")))?;
        *serial = restored;
        self.i8042.lock().unwrap().set_state(&s.i8042);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn new_bus() -> (PioBus, Sink) {
        let sink = Sink::default();
        let efd = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (PioBus::new(Box::new(sink.clone()), efd(), efd()), sink)
    }

    #[test]
    fn serial_output_reaches_sink() {
        let (bus, sink) = new_bus();
        for b in b"hi\n" {
            bus.write(COM1_BASE, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn serial_input_visible_through_lsr() {
        let (bus, _) = new_bus();
        let mut d = [0u8];
        bus.read(COM1_BASE + 5, &mut d);
        assert_eq!(d[0] & 1, 0);
        assert_eq!(bus.serial_input(b"v"), 1);
        bus.read(COM1_BASE + 5, &mut d);
        assert_eq!(d[0] & 1, 1);
        bus.read(COM1_BASE, &mut d);
        assert_eq!(d[0], b'v');
    }

    #[test]
    fn exit_port_and_reset() {
        let (bus, _) = new_bus();
        assert_eq!(bus.write(EXIT_PORT, &[7]), Some(DeviceExit::Status(7)));
        assert_eq!(bus.write(I8042_CMD, &[0xfe]), Some(DeviceExit::Reset));
        assert_eq!(bus.write(0x1234, &[1]), None);
    }

    #[test]
    fn ctrl_alt_del_scancodes() {
        let (bus, _) = new_bus();
        bus.ctrl_alt_del();
        let mut got = vec![];
        let mut d = [0u8];
        loop {
            bus.read(I8042_CMD, &mut d);
            if d[0] & SB_OBF == 0 {
                break;
            }
            bus.read(I8042_DATA, &mut d);
            got.push(d[0]);
        }
        assert_eq!(got, vec![0x1d, 0x38, 0x53]);
    }

    #[test]
    fn state_round_trip() {
        let (bus, _) = new_bus();
        bus.serial_input(b"abc");
        bus.ctrl_alt_del();
        let s = bus.save();
        let (bus2, _) = new_bus();
        bus2.restore(&s).unwrap();
        let s2 = bus2.save();
        assert_eq!(s, s2);
    }

    #[test]
    fn post_port_marks_first_instruction() {
        let (bus, _) = new_bus();
        assert!(bus.first_guest_io().is_none());
        bus.write(POST_PORT, &[0]);
        assert!(bus.first_guest_io().is_some());
    }
}
