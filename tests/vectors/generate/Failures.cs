// Failure vectors: the ResponseMessage a Tentacle answers when a service
// method throws (a TargetInvocationException around the method's exception,
// as Halibut's ServiceInvoker throws it) and when Halibut itself cannot find
// the service or method. The ServerError is built as Halibut's
// ResponseMessage.ServerErrorFromException does: Message = the innermost
// message, Details = ex.ToString(), HalibutErrorType = the type name for
// HalibutClientExceptions only.
//
// The exceptions are constructed, never thrown, so they have no stack trace
// and ToString() is deterministic; an agent has no .NET stack to show.
//
// Mono prints an inner exception the .NET Framework way, on the same line
// (" ---> "). .NET Core 3.0 and later, which a current Linux Tentacle runs on,
// start it on a new line (Environment.NewLine + " ---> "; dotnet/runtime
// src/libraries/System.Private.CoreLib/src/System/Exception.cs, ToString()).
// CoreToString() writes that shape from the real exception's own type name,
// Message and resource text, and checks that it differs from Mono's own
// ToString() in that one place only, so every other byte is .NET's.
using System;
using System.Collections.Generic;
using System.IO;
using System.Reflection;
using Halibut.Transport.Protocol;

namespace Halibut
{
    // Stand-ins with the real names and message handling
    // (source/Halibut/HalibutClientException.cs, Exceptions/*.cs).
    public class HalibutClientException : Exception
    {
        public HalibutClientException(string message) : base(message) { }
        public HalibutClientException(string message, Exception inner) : base(message, inner) { }
    }
}

namespace Halibut.Exceptions
{
    public class NoMatchingServiceOrMethodHalibutClientException : HalibutClientException
    {
        public NoMatchingServiceOrMethodHalibutClientException(string message) : base(message) { }
        public NoMatchingServiceOrMethodHalibutClientException(string message, Exception inner) : base(message, inner) { }
    }

    public class ServiceNotFoundHalibutClientException : NoMatchingServiceOrMethodHalibutClientException
    {
        public ServiceNotFoundHalibutClientException(string message) : base(message) { }
    }

    public class MethodNotFoundHalibutClientException : NoMatchingServiceOrMethodHalibutClientException
    {
        public MethodNotFoundHalibutClientException(string message) : base(message) { }
    }

    public class AmbiguousMethodMatchHalibutClientException : NoMatchingServiceOrMethodHalibutClientException
    {
        public AmbiguousMethodMatchHalibutClientException(string message, Exception inner) : base(message, inner) { }
    }
}

public static class FailureVectors
{
    const string Id = "IFileTransferService::UploadFileAsync[{0}] / 0b3f1c6e-2d4a-4b8e-9c1d-5e6f7a8b9c0d";

    static string EndOfInnerExceptionStack()
    {
        // The runtime's own resource text, as its ToString() writes it.
        var text = new Exception("outer", new Exception("inner")).ToString();
        return text.Substring(text.LastIndexOf(Environment.NewLine, StringComparison.Ordinal) + Environment.NewLine.Length);
    }

    // Exception.ToString() of .NET Core 3.0+ for an exception with no stack trace.
    static string CoreToString(Exception e)
    {
        var text = e.GetType().ToString();
        if (!string.IsNullOrEmpty(e.Message)) text += ": " + e.Message;
        if (e.InnerException != null)
        {
            text += Environment.NewLine + " ---> " + CoreToString(e.InnerException) + Environment.NewLine + EndOfInnerExceptionStack();
        }
        if (e.StackTrace != null) throw new InvalidOperationException("a vector's exception must not have been thrown");
        var framework = e.ToString();
        if (text.Replace(Environment.NewLine + " ---> ", " ---> ") != framework)
        {
            throw new InvalidOperationException("ToString() differs from Mono's by more than the inner-exception line break:\n" + text + "\n" + framework);
        }
        return text;
    }

    // Halibut's ExceptionExtensions.UnpackFromContainers.
    static Exception Unpack(Exception e)
    {
        if (e is TargetInvocationException && e.InnerException != null) return Unpack(e.InnerException);
        return e;
    }

    static ResponseMessage FromException(int counter, Exception ex)
    {
        return new ResponseMessage
        {
            Id = string.Format(Id, counter),
            Error = new ServerError
            {
                Message = Unpack(ex).Message,
                Details = CoreToString(ex),
                HalibutErrorType = ex is Halibut.HalibutClientException ? ex.GetType().FullName : null,
            },
        };
    }

    static Exception Invocation(Exception inner) { return new TargetInvocationException(inner); }

    public static void Add(Action<string, string, object> write)
    {
        var counter = 100;
        write("failure_file_not_found_response", "a service method threw FileNotFoundException",
            FromException(counter++, Invocation(new FileNotFoundException("Could not find file '/srv/app/missing.txt'."))));
        write("failure_unauthorized_response", "a service method threw UnauthorizedAccessException",
            FromException(counter++, Invocation(new UnauthorizedAccessException("Access to the path '/etc/shadow' is denied."))));
        write("failure_argument_response", "a service method threw ArgumentException (a refused request)",
            FromException(counter++, Invocation(new ArgumentException("/etc is a folder, not a file"))));
        write("failure_io_response", "a service method threw IOException",
            FromException(counter++, Invocation(new IOException("Could not write /srv/app/x: No space left on device"))));
        write("failure_invalid_operation_response", "InvalidOperationException with a multi-line, non-ASCII message",
            FromException(counter++, Invocation(new InvalidOperationException("first line\nsecond: \u00e9t\u00e9 \u2603 'quoted' \"too\""))));
        write("failure_empty_message_response", "an exception with an empty message: no ': ' after its type",
            FromException(counter++, Invocation(new InvalidOperationException(""))));
        write("failure_service_not_found_response", "Halibut's ServiceNotFoundHalibutClientException",
            FromException(counter++, new Halibut.Exceptions.ServiceNotFoundHalibutClientException("Service not found: IScriptServiceV9")));
        write("failure_method_not_found_response", "Halibut's MethodNotFoundHalibutClientException",
            FromException(counter++, new Halibut.Exceptions.MethodNotFoundHalibutClientException(
                "Method Octopus.Tentacle.Contracts.IFileTransferService::FrobnicateAsync not found")));
        var ambiguous = "Could not decide which candidate to call out of the following methods:" + Environment.NewLine
            + " - UploadFileAsync(String remotePath, DataStream upload, CancellationToken cancellationToken)" + Environment.NewLine
            + "The request arguments were:" + Environment.NewLine
            + "String, <null>, Int32" + Environment.NewLine;
        write("failure_ambiguous_method_response", "Halibut's AmbiguousMethodMatchHalibutClientException, with its inner AmbiguousMatchException",
            FromException(counter++, new Halibut.Exceptions.AmbiguousMethodMatchHalibutClientException(ambiguous, new AmbiguousMatchException(ambiguous))));
    }
}
