// Stand-ins for the Tentacle contract types, compiled into an assembly named
// "Octopus.Tentacle.Contracts" so Json.NET writes the real "$type" names.
// Namespaces, class names, property types and property declaration order
// follow OctopusDeploy/OctopusTentacle source/Octopus.Tentacle.Contracts/**
// (Json.NET writes properties in declaration order, so order matters).
// Constructors are simplified: the generator only serializes.
using System;
using System.Collections.Generic;
using Halibut;

namespace Octopus.Tentacle.Contracts
{
    public enum ScriptIsolationLevel { NoIsolation, FullIsolation }

    public enum ScriptType { PowerShell, Bash }

    public enum ProcessState { Pending, Running, Complete }

    public enum ProcessOutputSource { StdOut, StdErr, Debug }

    public class ScriptTicket
    {
        public ScriptTicket(string taskId) { TaskId = taskId; }
        public string TaskId { get; }
    }

    public class ScriptFile
    {
        public ScriptFile(string name, DataStream contents, string encryptionPassword)
        {
            Name = name;
            Contents = contents;
            EncryptionPassword = encryptionPassword;
        }

        public string Name { get; }
        public DataStream Contents { get; }
        public string EncryptionPassword { get; }
    }

    public class StartScriptCommand
    {
        public StartScriptCommand(string scriptBody, ScriptIsolationLevel isolation, TimeSpan scriptIsolationMutexTimeout,
            string isolationMutexName, string[] arguments, string taskId)
        {
            Arguments = arguments;
            TaskId = taskId;
            ScriptBody = scriptBody;
            Isolation = isolation;
            ScriptIsolationMutexTimeout = scriptIsolationMutexTimeout;
            IsolationMutexName = isolationMutexName;
        }

        public string ScriptBody { get; }
        public ScriptIsolationLevel Isolation { get; }
        public Dictionary<ScriptType, string> Scripts { get; } = new Dictionary<ScriptType, string>();
        public List<ScriptFile> Files { get; } = new List<ScriptFile>();
        public string[] Arguments { get; }
        public string TaskId { get; }
        public TimeSpan ScriptIsolationMutexTimeout { get; }
        public string IsolationMutexName { get; }
    }

    public class ScriptStatusRequest
    {
        public ScriptStatusRequest(ScriptTicket ticket, long lastLogSequence) { Ticket = ticket; LastLogSequence = lastLogSequence; }
        public ScriptTicket Ticket { get; }
        public long LastLogSequence { get; }
    }

    public class CancelScriptCommand
    {
        public CancelScriptCommand(ScriptTicket ticket, long lastLogSequence) { Ticket = ticket; LastLogSequence = lastLogSequence; }
        public ScriptTicket Ticket { get; }
        public long LastLogSequence { get; }
    }

    public class CompleteScriptCommand
    {
        public CompleteScriptCommand(ScriptTicket ticket, long lastLogSequence) { Ticket = ticket; LastLogSequence = lastLogSequence; }
        public ScriptTicket Ticket { get; }
        public long LastLogSequence { get; }
    }

    public class ProcessOutput
    {
        public ProcessOutput(ProcessOutputSource source, string text, DateTimeOffset occurred)
        {
            Source = source;
            Text = text;
            Occurred = occurred;
        }

        public ProcessOutputSource Source { get; }
        public DateTimeOffset Occurred { get; }
        public string Text { get; }
    }

    public class ScriptStatusResponse
    {
        public ScriptStatusResponse(ScriptTicket ticket, ProcessState state, int exitCode, List<ProcessOutput> logs, long nextLogSequence)
        {
            Ticket = ticket;
            State = state;
            ExitCode = exitCode;
            Logs = logs;
            NextLogSequence = nextLogSequence;
        }

        public ScriptTicket Ticket { get; }
        public List<ProcessOutput> Logs { get; }
        public long NextLogSequence { get; }
        public ProcessState State { get; }
        public int ExitCode { get; }
    }

    public class UploadResult
    {
        public UploadResult(string fullPath, string hash, long length) { FullPath = fullPath; Hash = hash; Length = length; }
        public string FullPath { get; }
        public string Hash { get; }
        public long Length { get; }
    }
}

namespace Octopus.Tentacle.Contracts.ScriptServiceV2
{
    public class StartScriptCommandV2
    {
        public StartScriptCommandV2(string scriptBody, ScriptIsolationLevel isolation, TimeSpan scriptIsolationMutexTimeout,
            string isolationMutexName, string[] arguments, string taskId, ScriptTicket scriptTicket,
            TimeSpan? durationToWaitForScriptToFinish)
        {
            Arguments = arguments;
            TaskId = taskId;
            ScriptTicket = scriptTicket;
            DurationToWaitForScriptToFinish = durationToWaitForScriptToFinish;
            ScriptBody = scriptBody;
            Isolation = isolation;
            ScriptIsolationMutexTimeout = scriptIsolationMutexTimeout;
            IsolationMutexName = isolationMutexName;
        }

        public ScriptTicket ScriptTicket { get; set; }
        public string ScriptBody { get; }
        public string TaskId { get; }
        public TimeSpan? DurationToWaitForScriptToFinish { get; }
        public ScriptIsolationLevel Isolation { get; }
        public TimeSpan ScriptIsolationMutexTimeout { get; }
        public string IsolationMutexName { get; }
        public Dictionary<ScriptType, string> Scripts { get; } = new Dictionary<ScriptType, string>();
        public List<ScriptFile> Files { get; } = new List<ScriptFile>();
        public string[] Arguments { get; }
    }

    public class ScriptStatusRequestV2
    {
        public ScriptStatusRequestV2(ScriptTicket ticket, long lastLogSequence) { Ticket = ticket; LastLogSequence = lastLogSequence; }
        public ScriptTicket Ticket { get; }
        public long LastLogSequence { get; }
    }

    public class CancelScriptCommandV2
    {
        public CancelScriptCommandV2(ScriptTicket ticket, long lastLogSequence) { Ticket = ticket; LastLogSequence = lastLogSequence; }
        public ScriptTicket Ticket { get; }
        public long LastLogSequence { get; }
    }

    public class CompleteScriptCommandV2
    {
        public CompleteScriptCommandV2(ScriptTicket ticket) { Ticket = ticket; }
        public ScriptTicket Ticket { get; }
    }

    public class ScriptStatusResponseV2
    {
        public ScriptStatusResponseV2(ScriptTicket ticket, ProcessState state, int exitCode, List<ProcessOutput> logs, long nextLogSequence)
        {
            Ticket = ticket;
            State = state;
            ExitCode = exitCode;
            Logs = logs;
            NextLogSequence = nextLogSequence;
        }

        public ScriptTicket Ticket { get; }
        public List<ProcessOutput> Logs { get; }
        public long NextLogSequence { get; }
        public ProcessState State { get; }
        public int ExitCode { get; }
    }
}

namespace Octopus.Tentacle.Contracts.Capabilities
{
    public class CapabilitiesResponseV2
    {
        public List<string> SupportedCapabilities { get; }
        public CapabilitiesResponseV2(List<string> supportedCapabilities) { SupportedCapabilities = supportedCapabilities; }
    }
}
